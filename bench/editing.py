"""The editing application in the digits world: poegen vs baselines at equal expert evaluations.

:mod:`poegen.expert_servers.digits.editing`: held-out 6s, a bar rendered by the graphics
expert, the target label "eight". Main metric: the share of edits the judge
(``classifier-judge``, which steers nothing) calls an 8 (expectation under the returned
weights, mean over the inputs). Also: background PSNR outside the mask (dB, torchmetrics on
pixels in [0, 1]; mean over inputs of the PSNR of all edits of an input; +inf = exactly the
input), the same PSNR of the uncomposited clean estimates, and the stroke IoU. Methods, at
poegen's evaluations E per input (samples summed over experts):

* ``poegen``: prior × keep × stroke tie × reward, SMC with one Langevin move per level;
* ``prior inpainting``: prior × keep only, the same kernel, as many particles as E buys;
* ``paste``: the input with the silhouette set white (no expert evaluated).

:func:`bench_editing` returns the figures in the shape of ``bench_layout`` of
``bench/apps.py``, which writes them into ``bench/results/apps.json`` stamped with the commit.
Standalone it prints the table only (no result file: ``apps`` is where the figures live)::

    python -m poegen.bench.editing [--quick] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from poegen.bench import baselines
from poegen.expert_servers.digits import editing, model_path
from poegen.kernel.sampler import sample

INPUTS = 6  # held-out 6s edited per seed
KEYS = ("judge_share", "psnr", "psnr_uncomposited", "iou")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (NaN for one value or infinite values)."""
    mean = _mean(values)
    if len(values) < 2 or not math.isfinite(mean):
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _scored(judge: Any, x0: torch.Tensor, log_w: Any, image: torch.Tensor, masks: Any) -> dict:
    edited = editing.composite(image, x0, masks.keep)
    out = editing.metrics(judge, edited, log_w, image, masks)
    out["psnr_uncomposited"] = editing.background_psnr(x0, image, masks.silhouette)
    return out


def editing_methods(
    experts: dict[str, Any], settings: Any, seed: int, masks: editing.Render
) -> dict[str, Any]:
    """poegen and the two baselines on one seed, each over :data:`INPUTS` inputs."""
    rows: dict[str, list[dict[str, float]]] = {"poegen": [], "prior inpainting": [], "paste": []}
    evals = {"poegen": 0, "prior inpainting": 0, "paste": 0}
    particles = {"poegen": settings.num_particles, "paste": 1}
    seconds = dict.fromkeys(rows, 0.0)
    judge = experts["judge"]
    for k, image in enumerate(editing.held_out_sources(INPUTS)):
        generator = torch.Generator().manual_seed(1000 * seed + k)
        started = time.perf_counter()
        fs = editing.factors(experts["flow-all"], experts["reward"], image, masks)
        result = sample(fs, editing.SAMPLE_SHAPE, settings, generator=generator)
        total = sum(baselines.evaluations(result).values())
        rows["poegen"].append(_scored(judge, result.particles, result.log_weights, image, masks))
        evals["poegen"] += total
        seconds["poegen"] += time.perf_counter() - started

        started = time.perf_counter()
        inpaint = editing.inpainting_factors(experts["flow-all"], image, masks)
        n = total // baselines.cost_per_particle(settings, 1, 1)
        particles["prior inpainting"] = n
        alone = sample(
            inpaint, editing.SAMPLE_SHAPE, settings.model_copy(update={"num_particles": n}),
            generator=torch.Generator().manual_seed(1000 * seed + k),
        )  # fmt: skip
        rows["prior inpainting"].append(
            _scored(judge, alone.particles, alone.log_weights, image, masks)
        )
        evals["prior inpainting"] += sum(baselines.evaluations(alone).values())
        seconds["prior inpainting"] += time.perf_counter() - started

        pasted = editing.paste(image, masks.silhouette)[None]
        rows["paste"].append(_scored(judge, pasted, None, image, masks))
    return {
        m: {key: _mean([r[key] for r in rows[m]]) for key in KEYS}
        | {
            "evaluations": evals[m] // INPUTS,
            "particles": particles[m],
            "seconds": round(seconds[m], 2),
        }
        for m in rows
    }


def bench_editing(experts: dict[str, Any], scale: float, seeds: int) -> dict[str, Any]:
    """poegen vs the baselines over ``seeds`` seeds; ``experts``: ``flow-all`` (the prior),
    ``reward`` and ``judge`` (classifiers, unprepared). Evaluations are per input."""
    settings = editing.settings(scale)
    with tempfile.TemporaryDirectory(prefix="poegen-editing-") as root:
        masks = editing.render(editing.write_assets(Path(root)))
    runs = [editing_methods(experts, settings, seed, masks) for seed in range(seeds)]
    methods: dict[str, Any] = {}
    for method in runs[0]:
        entry: dict[str, Any] = {}
        for key in KEYS:
            mean, se = mean_se([r[method][key] for r in runs])
            entry[key], entry[key + "_se"] = mean, se
        for key in ("evaluations", "particles"):
            entry[key] = runs[0][method][key]
        entry["seconds"] = round(_mean([r[method]["seconds"] for r in runs]), 2)
        methods[method] = entry
    return {
        "metric": "judge share of the target label",
        "higher_is_better": True,
        "poegen": methods["poegen"]["judge_share"],
        "baselines": {m: v["judge_share"] for m, v in methods.items() if m != "poegen"},
        "evaluations": methods["poegen"]["evaluations"],
        "psnr": {m: v["psnr"] for m, v in methods.items()},
        "iou": {m: v["iou"] for m, v in methods.items()},
        "inputs": INPUTS,
        "seeds": seeds,
        "settings": settings.model_dump(),
        "methods": methods,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'method':<18} {'judge share':>11} {'± s.e.':>7} {'PSNR dB':>8} {'raw PSNR':>8} "
        f"{'IoU':>6} {'evals':>7} {'N':>5} {'s':>6}"
    ]
    for method, row in results["methods"].items():
        lines.append(
            f"{method:<18} {row['judge_share']:11.3f} {row['judge_share_se']:7.3f} "
            f"{row['psnr']:8.1f} {row['psnr_uncomposited']:8.1f} {row['iou']:6.3f} "
            f"{row['evaluations']:7d} {row['particles']:5d} {row['seconds']:6.1f}"
        )
    return "\n".join(lines)


def load_experts() -> dict[str, Any]:
    from poegen.expert_servers.classifier import ClassifierAdapter
    from poegen.expert_servers.flow import FlowAdapter
    from poegen.expert_servers.server.adapter import ModelRef

    def load(adapter: Any, name: str) -> Any:
        return adapter.load(ModelRef(name, model_path(name)), {}, lambda f, m: None).expert

    return {
        "flow-all": load(FlowAdapter(), "flow-all"),
        "reward": load(ClassifierAdapter(), "classifier-reward"),
        "judge": load(ClassifierAdapter(), "classifier-judge"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="poegen editing benchmark (digits)")
    parser.add_argument("--quick", action="store_true", help="fewer particles, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scale, seeds = (0.125, 1) if args.quick else (1.0, args.seeds)
    results = bench_editing(load_experts(), scale, seeds)
    print(table(results))
    print(f"total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
