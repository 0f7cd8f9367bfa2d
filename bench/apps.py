"""The paper's applications in the digits world: poegen vs baselines at equal expert evaluations.

One run prints, per application, poegen and each baseline on the application's main metric,
judged by the held-out classifier (``classifier-judge``, which steers nothing), and writes
``bench/results/apps.json`` stamped with the commit::

    python -m poegen.bench.apps [--quick] [--seeds 3] [--out bench/results/apps.json]

**layout** (:mod:`poegen.expert_servers.digits.layout`): four boxes with labels on a 20×58
canvas. Main metric: the share of boxes whose crop the judge gives the box's label
(expectation under each method's returned weights). Also: stray ink, the share of pixels
outside every box brighter than 0.25 (0 = an empty background). Methods, at poegen's total
evaluations E (samples summed over experts):

* ``poegen``: the product (cropped class-conditional priors × background × a reward per
  box), SMC with one Langevin move per level;
* ``product without MCMC/SMC``: the same generative product, Euler, no moves, no reward, no
  resampling, with as many particles as E buys;
* ``paste``: each box's prior alone (no product), its samples pasted side by side in order
  (a later box overwrites an earlier one on the overlap), E/(boxes·(levels + 1)) per box.

**editing** (:mod:`poegen.bench.editing`): a held-out digit edited into the target label by a
rendered stroke; main metric the judge share of the target label (background PSNR and the
stroke's IoU beside it); baselines: pasting the render, the prior inpainting the mask.

**video** (:mod:`poegen.bench.video`, through a local stack of real servers): a digit along a
MuJoCo trajectory, made chunk by chunk; main metric the frame-to-frame appearance change
(centroid error against the simulation and the judge's label consistency beside it);
baselines: all frames annealed jointly, independent frames.

Every figure is a mean over ``--seeds`` seeds with its standard error. ``--app NAME``
(repeatable) runs some of the applications; the default runs all three.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.bench import baselines, provenance
from poegen.expert_servers.digits import layout, model_path
from poegen.kernel import ExpertKind, Factor, SamplerSettings
from poegen.kernel.sampler import sample

RESULTS = Path(__file__).resolve().parent / "results" / "apps.json"
STRAY_INK = 0.25  # a pixel in [0, 1] brighter than this outside the boxes is stray ink


def load(adapter: Any, name: str) -> Any:
    from poegen.expert_servers.server.adapter import ModelRef

    return adapter.load(ModelRef(name, model_path(name)), {}, lambda f, m: None).expert


def weighted_mean(values: Tensor, log_weights: Tensor | None) -> float:
    """Σ_i W_i·v_i (equal weights without ``log_weights``)."""
    if log_weights is None:
        return float(values.float().mean())
    w = log_weights.exp().to(torch.float64)
    return float((w * values.to(torch.float64)).sum() / w.sum())


def layout_metrics(judge: Any, x0: Tensor, log_weights: Tensor | None) -> dict[str, float]:
    hits = layout.judge_boxes(judge, x0).float().mean(1)
    stray = layout.background_ink(x0, threshold=STRAY_INK)
    return {
        "judge_share": weighted_mean(hits, log_weights),
        "stray_ink": weighted_mean(stray, log_weights),
    }


def layout_methods(experts: dict[str, Any], settings: SamplerSettings, seed: int) -> dict:
    """poegen and the two baselines on one seed: metrics, evaluations, seconds."""
    from poegen.expert_servers.server.adapter import Condition

    factors = layout.factors(experts["prior"], experts["reward"])
    out: dict[str, Any] = {}
    started = time.perf_counter()
    result = sample(factors, layout.CANVAS, settings, generator=torch.Generator().manual_seed(seed))
    total = sum(baselines.evaluations(result).values())
    out["poegen"] = layout_metrics(experts["judge"], result.particles, result.log_weights) | {
        "evaluations": total, "particles": settings.num_particles,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    plain = baselines.model_sampler(settings)
    generative = [f for f in factors if f.expert.describe().kind == ExpertKind.GENERATIVE]
    n = total // baselines.cost_per_particle(plain, len(generative), 0)
    started = time.perf_counter()
    product = sample(
        generative, layout.CANVAS, plain.model_copy(update={"num_particles": n}),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    out["product without MCMC/SMC"] = layout_metrics(experts["judge"], product.particles, None) | {
        "evaluations": sum(baselines.evaluations(product).values()), "particles": n,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    per_box = total // (len(layout.LAYOUT) * baselines.cost_per_particle(plain, 1, 0))
    started = time.perf_counter()
    digits, evaluations = [], 0
    for k, box in enumerate(layout.LAYOUT):
        prior = experts["prior"].prepare(Condition(scalars={"class_label": float(box.label)}))
        alone = sample(
            [Factor(prior, name=f"digit-{k}")], (1, layout.BOX_SIZE, layout.BOX_SIZE),
            plain.model_copy(update={"num_particles": per_box}),
            generator=torch.Generator().manual_seed(seed * 100 + k),
        )  # fmt: skip
        digits.append(alone.particles)
        evaluations += sum(baselines.evaluations(alone).values())
    out["paste"] = layout_metrics(experts["judge"], layout.paste(digits), None) | {
        "evaluations": evaluations, "particles": per_box,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def bench_layout(experts: dict[str, Any], scale: float, seeds: int) -> dict[str, Any]:
    settings = layout.settings(scale)
    runs = [layout_methods(experts, settings, seed) for seed in range(seeds)]
    methods: dict[str, Any] = {}
    for method in runs[0]:
        rows = [r[method] for r in runs]
        entry: dict[str, Any] = {}
        for key in ("judge_share", "stray_ink"):
            mean, se = mean_se([row[key] for row in rows])
            entry[key], entry[key + "_se"] = mean, se
        entry["evaluations"] = rows[0]["evaluations"]
        entry["particles"] = rows[0]["particles"]
        entry["seconds"] = round(sum(row["seconds"] for row in rows) / len(rows), 2)
        methods[method] = entry
    return {
        "metric": "judge share per box",
        "higher_is_better": True,
        "poegen": methods["poegen"]["judge_share"],
        "baselines": {m: v["judge_share"] for m, v in methods.items() if m != "poegen"},
        "evaluations": methods["poegen"]["evaluations"],
        "seeds": seeds,
        "settings": settings.model_dump(),
        "methods": methods,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'application':<12} {'method':<26} {'main metric':>14} {'± s.e.':>7} "
        f"{'stray ink':>9} {'evals':>7} {'N':>5} {'s':>6}"
    ]
    for app in ("layout",):
        for method, row in results[app]["methods"].items():
            lines.append(
                f"{app:<12} {method:<26} {row['judge_share']:14.3f} {row['judge_share_se']:7.3f} "
                f"{row['stray_ink']:9.4f} {row['evaluations']:7d} {row['particles']:5d} "
                f"{row['seconds']:6.1f}"
            )
    return "\n".join(lines)


APPS = ("layout", "editing", "video")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (see :func:`main`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="poegen applications benchmark (digits)")
    parser.add_argument("--quick", action="store_true", help="fewer particles, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--app", action="append", choices=APPS, help="only these (repeat)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from poegen.bench import editing, video
    from poegen.expert_servers.classifier import ClassifierAdapter
    from poegen.expert_servers.flow import FlowAdapter

    started = time.perf_counter()
    wanted = [app for app in APPS if app in (args.app or APPS)]
    scale, seeds = (0.125, 1) if args.quick else (1.0, args.seeds)
    results: dict[str, Any] = {
        "provenance": provenance.stamp("apps"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "processor": platform.processor() or platform.machine()},
    }  # fmt: skip
    if "layout" in wanted:
        experts = {
            "prior": load(FlowAdapter(), "flow-cond"),
            "reward": load(ClassifierAdapter(), "classifier-reward"),
            "judge": load(ClassifierAdapter(), "classifier-judge"),
        }
        results["layout"] = bench_layout(experts, scale, seeds)
        print(table(results))
    if "editing" in wanted:
        results["editing"] = editing.bench_editing(editing.load_experts(), scale, seeds)
        print(editing.table(results["editing"]))
    if "video" in wanted:
        particles, steps, runs = (4, 2, 1) if args.quick else (16, 12, max(seeds, 4))
        results["video"] = video.bench_video(particles, steps, runs, log=lambda line: None)
        print(video.table(results["video"]))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {results['seconds']}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # JSON has no infinity: a PSNR of +inf (an output equal to its input outside the mask,
    # MSE 0) and an undefined s.e. (one seed) are written as null
    args.out.write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
