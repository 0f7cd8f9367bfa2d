"""One flow expert over gRPC against the diffusers pipeline's ``__call__``, per family.

Run ``HF_HUB_OFFLINE=1 .venv/bin/python bench/pipeline_parity.py`` (``--quick`` for a smoke
run with the test-sized models; ``--families``, ``--scales``, ``--repeats`` to choose). It
prints three lines per family and size and writes ``bench/results/pipeline_parity.json``.

The poegen run is what a client does: connect to the expert host (``Describe``, ``Prepare``:
the prompts are encoded), take the expert's grid (``Schedule``), ``sample()`` one particle
with zero MCMC steps, every velocity a ``Velocity`` RPC over loopback, and ``Release``. The
pipeline call encodes the same prompts and runs the same steps from the same initial latents
(``output_type="latent"``: neither side decodes). For FLUX, SD3 and Wan text-to-video:

* **time ratio** (target ≤ 1.05): the runs go in rounds (pipeline, poegen, without gRPC;
  every other round in the reverse order), after one warm-up of each, and the ratio is the
  median over the rounds of poegen's wall time over the pipeline's *in the same round*, with
  a 90 % bootstrap interval of that median. On this shared virtual machine the CPU's own
  speed drifts by tens of percent within seconds (identical pipeline runs vary that much); a
  paired ratio cancels what drifts slower than a round. The ratio of the medians, of the
  fastest runs and of median CPU times (this process, all threads) are printed beside it.
* **at equal model time**: both sides run the same model work, bit for bit (the same text
  encoder calls, the same transformer forwards on the same inputs; max |Δ| is 0). Forward
  hooks time it on both sides, so each run splits into model time and time *outside the
  models* (scheduler, kernel, adapter, RPCs, Python). The ratio a round gives at the
  pipeline's model time, (pipeline's model time + poegen's time outside) / pipeline's wall
  time, is the wall-time ratio with the drift of the model work taken out: what poegen adds,
  measured where it happens. The median times outside the models are printed per side, and
  poegen's model time over the pipeline's (≈ 1: hosting the model in a worker thread does not
  slow it; the direct ratio would show it if it did).
* **without gRPC**: the same ratios for the same run on the expert object in-process
  (``prepare`` and ``sample()``): the adapter and kernel without the transport.
* **bare gRPC**: the least the RPCs of a run cost here: their number (Describe, Prepare,
  Schedule, one Velocity per step, Release) times one round trip through a bare ``grpc.aio``
  echo host on a thread of this process (:func:`echo_host`: raw bytes the size of a step's
  latents, a handler that sleeps a step's time in a worker thread, as the expert host's
  worker computes), as a share of the pipeline's time. No transport over ``grpc.aio`` costs
  less, so the ratio over gRPC cannot be below (ratio without gRPC) + that share.
* **encoder calls**: forward calls of the text encoders per run, counted by the same hooks;
  one per encoder and condition (prompt, negative prompt), never one per step.
* **max |Δ|**: the largest difference between the two outputs (the parity tests require
  ≤ 1e-5; the adapters reproduce the pipelines exactly in float32).

The models are random-weight folders built with :mod:`poegen.expert_servers.flow.tiny`, with
larger transformers than the tests use (``--quick``: the test sizes), so that a step costs what
a small real model's does on this CPU and the ratio measures the protocol's overhead, not
Python's. ``--scales`` runs each family at latent sides ×1 (FLUX and SD3 32×32, Wan 3×16×16:
a step of 60–110 ms here) and ×2 (4× the tokens: 250–450 ms, the order of a real FLUX, SD3 or
Wan step on a GPU): the RPCs cost the same per step, so their share shrinks as the step grows.
The expert host runs in this process on its own event-loop thread (as the tests' hosts do)
and computes in its worker thread; the kernel calls it from the main thread. The process
tunes its allocator at start as ``poegen serve`` does (see
:func:`poegen.expert_servers.server.create_server`). Torch runs ``--threads`` intra-op
threads (1 by default: on the shared 2-core machine, 2 threads oversubscribe and a forward's
time varies by ×2 from run to run). ``--repeats`` rounds (15 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

from poegen.expert_servers.flow import FluxAdapter, SD3Adapter, WanAdapter
from poegen.expert_servers.flow.tiny import build_flux, build_sd3, build_wan
from poegen.expert_servers.server import Condition, ModelRef, ServerConfig, create_server
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.kernel.transport import tune_allocator
from poegen.v1 import expert_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_parity.json"
PROMPT, NEGATIVE, SEED = "a red cube on a table", "blurry", 0
FAMILIES = ("flux", "sd3", "wan")


@dataclass(frozen=True)
class Case:
    """One family: how to build it, serve it, and call its pipeline."""

    name: str
    build: Callable[..., Path]
    adapter: Any
    pipeline: Any
    shape: tuple[int, ...]  # latent sample shape
    call: dict[str, Any]  # extra pipeline arguments
    guidance: float
    transformer: dict[str, Any]  # bench-sized transformer config
    encoders: tuple[str, ...]


def cases(quick: bool, scale: int = 1) -> list[Case]:
    """The three families; ``scale`` multiplies the latent height and width (bench sizes)."""
    big = not quick
    n = 32 * scale
    flux_shape = (16, n, n) if big else (16, 8, 8)
    sd3_shape = (4, n, n) if big else (4, 8, 8)
    wan_shape = (16, 3, n // 2, n // 2) if big else (16, 3, 4, 4)
    s = 2  # the tiny VAEs' spatial compression (FLUX/SD3); Wan's is 8
    return [
        Case(
            "flux", build_flux, FluxAdapter, FluxPipeline, flux_shape,
            dict(height=flux_shape[1] * s, width=flux_shape[2] * s), 3.5,
            dict(num_layers=2, num_single_layers=4, attention_head_dim=64,
                 num_attention_heads=4, axes_dims_rope=[16, 24, 24]) if big else {},
            ("text_encoder", "text_encoder_2"),
        ),
        Case(
            "sd3", build_sd3, SD3Adapter, StableDiffusion3Pipeline, sd3_shape,
            dict(height=sd3_shape[1] * s, width=sd3_shape[2] * s, negative_prompt=NEGATIVE), 4.0,
            dict(num_layers=4, attention_head_dim=64, num_attention_heads=4, patch_size=2,
                 sample_size=n, caption_projection_dim=256) if big else {},
            ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ),
        Case(
            "wan", build_wan, WanAdapter, WanPipeline, wan_shape,
            dict(height=wan_shape[2] * 8, width=wan_shape[3] * 8, num_frames=9,
                 negative_prompt=NEGATIVE), 5.0,
            dict(num_layers=4, attention_head_dim=64, num_attention_heads=4, ffn_dim=512)
            if big else {},
            ("text_encoder",),
        ),
    ]  # fmt: skip


class ForwardMeter:
    """Forward calls of a set of modules and the wall time spent inside them (hooks on the
    real modules; one forward at a time, in whichever thread runs it)."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.calls, self.seconds = 0, 0.0
        self._started = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, *_: Any) -> None:
        self._started = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - self._started

    def take(self) -> tuple[int, float]:
        """(calls, seconds) since the last take."""
        taken = self.calls, self.seconds
        self.calls, self.seconds = 0, 0.0
        return taken


class ServerThread:
    """A gRPC server on its own event-loop thread, as the tests' hosts run.

    ``start()`` is a coroutine (run on that loop) giving the server, anything with
    ``stop(grace)``, and its port.
    """

    def __init__(self, start: Callable[[], Awaitable[tuple[Any, int]]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def expert_host(served: Any) -> ServerThread:
    """The expert host serving ``served``."""

    async def start() -> tuple[Any, int]:
        host, port = create_server(ServerConfig(), expert=served)
        await host.start()
        return host, port

    return ServerThread(start)


def echo_host(sleep_s: float) -> ServerThread:
    """A bare ``grpc.aio`` echo of raw bytes (no protobuf, no poegen code), whose handler
    sleeps ``sleep_s`` in a worker thread, as a step's compute keeps the expert host's worker
    busy. One round trip through it is the least a gRPC call costs here."""
    executor = ThreadPoolExecutor(1)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.get_running_loop().run_in_executor(executor, time.sleep, sleep_s)
        return request

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo, _same, _same)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("Echo", {"Echo": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    return ServerThread(start)


def _same(data: bytes) -> bytes:
    return data


def grpc_floor_ms(payload_bytes: int, sleep_s: float, calls: int = 25) -> float:
    """Median time of one bare gRPC round trip (``payload_bytes`` each way) over ``sleep_s``."""
    host = echo_host(sleep_s)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            echo = channel.unary_unary("/Echo/Echo", request_serializer=_same,
                                       response_deserializer=_same)  # fmt: skip
            payload = bytes(payload_bytes)
            echo(payload)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                echo(payload)
                times.append(time.perf_counter() - started - sleep_s)
    finally:
        host.close()
    return statistics.median(times) * 1000


def condition(case: Case) -> expert_pb2.Condition:
    msg = expert_pb2.Condition(text=PROMPT, scalars={"guidance_scale": case.guidance})
    if case.name != "flux":
        msg.negative_text = NEGATIVE
    return msg


def poegen_run(address: str, case: Case, steps: int) -> torch.Tensor:
    """Connect (Describe, Prepare), Schedule, sample one particle: the client's whole run."""
    settings = SamplerSettings(num_particles=1, mcmc_steps=0, num_steps=steps, schedule="expert")
    with RemoteExpert.connect(address, condition=condition(case)) as remote:
        result = sample(
            [Factor(remote)], case.shape, settings, generator=torch.Generator().manual_seed(SEED)
        )
    return result.particles


def in_process_run(expert: Any, case: Case, steps: int) -> torch.Tensor:
    """The same run without gRPC: Prepare and sample() on the expert object itself."""
    negative = "" if case.name == "flux" else NEGATIVE
    view = expert.prepare(
        Condition(text=PROMPT, negative_text=negative, scalars={"guidance_scale": case.guidance})
    )
    settings = SamplerSettings(num_particles=1, mcmc_steps=0, num_steps=steps, schedule="expert")
    generator = torch.Generator().manual_seed(SEED)
    return sample([Factor(view)], case.shape, settings, generator=generator).particles


def pipeline_run(pipe: Any, case: Case, steps: int) -> torch.Tensor:
    noise = torch.randn((1, *case.shape), generator=torch.Generator().manual_seed(SEED))
    latents = FluxPipeline._pack_latents(noise, 1, *case.shape) if case.name == "flux" else noise
    out = pipe(
        PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=case.guidance,
        output_type="latent", max_sequence_length=16, **case.call,
    )  # fmt: skip
    if case.name == "wan":
        return out.frames
    if case.name == "flux":
        return FluxPipeline._unpack_latents(out.images, case.call["height"], case.call["width"], 2)
    return out.images


def measure(case: Case, root: Path, steps: int, repeats: int) -> dict[str, Any]:
    folder = case.build(root / case.name, transformer=case.transformer)
    ref = ModelRef(case.name, folder)
    served = case.adapter().load(ref, {"max_sequence_length": "16"}, lambda f, m: None)
    pipe = case.pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # the model work both sides share: text encoders (counted too) and transformer forwards
    encoders = {
        "ours": ForwardMeter([getattr(served.expert.pipe, n) for n in case.encoders]),
        "theirs": ForwardMeter([getattr(pipe, n) for n in case.encoders]),
    }
    transformers = {
        "ours": ForwardMeter([served.expert.pipe.transformer]),
        "theirs": ForwardMeter([pipe.transformer]),
    }
    host = expert_host(served)
    address = f"127.0.0.1:{host.port}"
    try:
        with torch.no_grad():
            ours, theirs = poegen_run(address, case, steps), pipeline_run(pipe, case, steps)
        encoder_calls = {k: meter.take()[0] for k, meter in encoders.items()}
        for meter in transformers.values():
            meter.take()
        runs = {  # side: (whose copy of the model it runs, the run)
            "pipeline": ("theirs", lambda: pipeline_run(pipe, case, steps)),
            "poegen": ("ours", lambda: poegen_run(address, case, steps)),
            "in_process": ("ours", lambda: in_process_run(served.expert, case, steps)),
        }
        times: dict[str, list[float]] = {side: [] for side in runs}
        cpu: dict[str, list[float]] = {side: [] for side in runs}
        model: dict[str, list[float]] = {side: [] for side in runs}
        for round_ in range(repeats):
            # every other round backwards: a drift within a round favours no side on average
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for side in order:
                copy, run = runs[side]
                started, cpu_started = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    run()
                times[side].append(time.perf_counter() - started)
                cpu[side].append(time.process_time() - cpu_started)
                model[side].append(encoders[copy].take()[1] + transformers[copy].take()[1])
    finally:
        host.close()
    poegen_s, pipeline_s = statistics.median(times["poegen"]), statistics.median(times["pipeline"])
    # Describe, Prepare, Schedule, a Velocity per step, Release; each at least a bare round trip
    rpcs = steps + 4
    floor_ms = grpc_floor_ms(4 * math.prod(case.shape), pipeline_s / steps)
    # time outside the shared model work, and the ratio a round gives at the pipeline's
    # model time: (pipeline's model time + our time outside it) / pipeline's wall time
    outside = {
        side: [t - m for t, m in zip(times[side], model[side], strict=True)] for side in runs
    }
    base = list(zip(outside["pipeline"], times["pipeline"], strict=True))
    corrected = {
        side: [
            1 + (o - o_pipe) / t_pipe
            for o, (o_pipe, t_pipe) in zip(outside[side], base, strict=True)
        ]
        for side in ("poegen", "in_process")
    }
    ratios = round_ratios(times["poegen"], times["pipeline"])
    return {
        "family": case.name,
        "latent_shape": list(case.shape),
        "steps": steps,
        "rounds": repeats,
        "poegen_s": poegen_s,
        "pipeline_s": pipeline_s,
        "ratio": statistics.median(ratios),
        "ratio_ci90": median_ci(ratios),
        "ratio_of_medians": poegen_s / pipeline_s,
        "ratio_min": min(times["poegen"]) / min(times["pipeline"]),
        "cpu_ratio": statistics.median(cpu["poegen"]) / statistics.median(cpu["pipeline"]),
        "in_process_ratio": paired_ratio(times["in_process"], times["pipeline"]),
        "in_process_cpu_ratio": statistics.median(cpu["in_process"])
        / statistics.median(cpu["pipeline"]),
        "model_time_ratio": paired_ratio(model["poegen"], model["pipeline"]),
        "in_process_model_time_ratio": paired_ratio(model["in_process"], model["pipeline"]),
        "outside_model_ms": {side: statistics.median(o) * 1000 for side, o in outside.items()},
        "corrected_ratio": statistics.median(corrected["poegen"]),
        "corrected_ci90": median_ci(corrected["poegen"]),
        "in_process_corrected_ratio": statistics.median(corrected["in_process"]),
        "rpcs_per_run": rpcs,
        "grpc_floor_ms": floor_ms,
        "grpc_floor_share": rpcs * floor_ms / 1000 / pipeline_s,
        "encoder_calls_poegen": encoder_calls["ours"],
        "encoder_calls_pipeline": encoder_calls["theirs"],
        "max_abs_diff": float((ours - theirs).abs().max()),
        "times": times,
        "cpu_s": cpu,
        "model_s": model,
    }


def round_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """``ours[i] / theirs[i]`` per round (runs of one round are adjacent)."""
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median over rounds of :func:`round_ratios`."""
    return statistics.median(round_ratios(ours, theirs))


def median_ci(values: Sequence[float], level: float = 0.9, resamples: int = 4000) -> list[float]:
    """A percentile-bootstrap interval of the median of ``values`` (seeded: reproducible)."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return [medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]]


def row_text(r: dict[str, Any]) -> str:
    """One family's results, as printed."""
    lo, hi = r["ratio_ci90"]
    c_lo, c_hi = r["corrected_ci90"]
    outside = r["outside_model_ms"]
    return (
        f"{r['family']:5s} latents {tuple(r['latent_shape'])!s:16s} steps {r['steps']:3d}  "
        f"pipeline {r['pipeline_s']:7.3f} s  poegen {r['poegen_s']:7.3f} s\n"
        f"      ratio {r['ratio']:5.3f} (90 % CI {lo:5.3f}-{hi:5.3f}; medians "
        f"{r['ratio_of_medians']:5.3f}, minima {r['ratio_min']:5.3f}, CPU time "
        f"{r['cpu_ratio']:5.3f})  without gRPC {r['in_process_ratio']:5.3f}\n"
        f"      at equal model time {r['corrected_ratio']:5.3f} (90 % CI {c_lo:5.3f}-{c_hi:5.3f};"
        f" without gRPC {r['in_process_corrected_ratio']:5.3f})  outside the models: pipeline "
        f"{outside['pipeline']:.0f} ms, poegen {outside['poegen']:.0f} ms, without gRPC "
        f"{outside['in_process']:.0f} ms; model time over the pipeline's: poegen "
        f"{r['model_time_ratio']:5.3f}, without gRPC {r['in_process_model_time_ratio']:5.3f}\n"
        f"      bare gRPC {r['rpcs_per_run']} x {r['grpc_floor_ms']:.1f} ms = "
        f"{r['grpc_floor_share']:.3f} of the pipeline  encoder calls "
        f"{r['encoder_calls_poegen']} (pipeline {r['encoder_calls_pipeline']})  max|Δ| "
        f"{r['max_abs_diff']:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="test-sized models, fewer repeats")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (15)")
    parser.add_argument(
        "--scales", type=int, nargs="+", default=None,
        help="latent side multipliers, one table each (default: 1 2; --quick: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="(all)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()  # an entry point hosting an expert, as `poegen serve` (see create_server)
    steps = args.steps or (4 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 15)
    scales = args.scales or ([1] if args.quick else [1, 2])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        chosen = ((k, c) for k in scales for c in cases(args.quick, k) if c.name in args.families)
        for scale, case in chosen:
            rows.append(measure(case, Path(tmp) / f"x{scale}", steps, repeats))
            print(row_text(rows[-1]), flush=True)
    report = {
        "benchmark": "pipeline_parity",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "target_ratio": 1.05,
        "results": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
