"""The digits benchmark: trained experts composed, judged by a classifier that did not steer.

The learned-model counterpart of the exact-target suite (:mod:`poegen.bench.accuracy`). The
experts are the shipped digit models (:mod:`poegen.expert_servers.digits`), in this process:
three rectified-flow priors through :class:`~poegen.expert_servers.flow.FlowAdapter` and the
reward classifier through :class:`~poegen.expert_servers.classifier.ClassifierAdapter`. A
second classifier (another architecture and seed) is only the **judge**: no figure is graded by
the expert that steered it. Three compositions (:mod:`poegen.expert_servers.digits.compose`):

1. ``reward``: prior (all digits) × reward log p("three" | x̂_0). Share of samples the judge
   calls a 3; poegen (SMC + resample-move MCMC) vs plain prior sampling, FK steering (reward
   resampling without MCMC) and best-of-k, at equal expert evaluations.
2. ``product``: the {0–4} prior × the even-digit prior. Share judged in {0, 2, 4}; poegen
   (annealed Langevin on the summed scores, ``mcmc_steps`` per level) vs summed scores without
   MCMC (Composable Diffusion) at equal evaluations, and each prior alone.
3. ``completion``: the left half of held-out digits tied by a masked-target constraint
   (noised-replacement proposal + Gaussian tie), the all-digits prior completing the rest.
   Share of completions the judge gives the held-out digit's true label; poegen vs the same
   without MCMC (FK) and best-of-k.

Also per method: distinct samples out of the N returned (resampled copies are identical until
something moves them), evaluations and wall time. Shares are expectations under each method's
returned weights (Σ W_i·1[judge(x_i) ∈ A]). Baselines are :mod:`poegen.bench.baselines`
(configurations of the same kernel at the same budget). One run; the JSON goes to
``bench/results/digits.json``::

    python -m poegen.bench.digits [--quick] [--out bench/results/digits.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.bench import baselines, provenance
from poegen.expert_servers.digits import compose
from poegen.kernel import ExpertKind, Factor, SamplerSettings

RESULTS = Path(__file__).resolve().parent / "results" / "digits.json"


@dataclass(frozen=True)
class DigitsTask:
    """A :class:`poegen.bench.tasks.Task` without an exact target (what baselines read)."""

    name: str
    description: str
    factors: tuple[Factor, ...]
    sample_shape: tuple[int, ...] = compose.SAMPLE_SHAPE
    settings: SamplerSettings = field(default_factory=SamplerSettings)

    def of_kind(self, kind: ExpertKind) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if f.expert.describe().kind == kind)

    @property
    def generative(self) -> tuple[Factor, ...]:
        return self.of_kind(ExpertKind.GENERATIVE)

    @property
    def rewards(self) -> tuple[Factor, ...]:
        # best-of-k scores x̂_0 itself: a pixel-input reward reads it decoded, as the kernel does
        return tuple(compose.on_latents(f) for f in self.of_kind(ExpertKind.DISCRIMINATIVE))

    @property
    def constraints(self) -> tuple[Factor, ...]:
        return self.of_kind(ExpertKind.CONSTRAINT)


def weighted_share(classes: Tensor, log_w: Tensor | None, wanted: set[int]) -> float:
    """Σ_i W_i·1[class_i ∈ wanted] (equal weights when ``log_w`` is None)."""
    n = classes.shape[0]
    w = torch.full((n,), 1.0 / n) if log_w is None else log_w.exp().to(torch.float32)
    hit = torch.isin(classes, torch.tensor(sorted(wanted)))
    return float((w * hit).sum() / w.sum())


def distinct(x: Tensor, log_w: Tensor | None) -> int:
    """How many different samples carry weight (copies of one ancestor count once)."""
    keep = x if log_w is None else x[log_w > -math.inf]
    return int(torch.unique(keep.reshape(keep.shape[0], -1).round(decimals=5), dim=0).shape[0])


def summary(run: baselines.Run, classes: Tensor, wanted: set[int]) -> dict[str, Any]:
    return dict(
        share=weighted_share(classes, run.log_weights, wanted),
        distinct=distinct(run.particles, run.log_weights),
        returned=int(run.particles.shape[0]),
        particles=run.num_particles,
        evaluations=run.total_evaluations,
        seconds=round(run.seconds, 2),
    )


def judge_classes(judge: Any, x0: Tensor) -> Tensor:
    """The judge's class of each clean sample in [-1, 1]."""
    return judge.log_probs(compose.to_pixels(x0)).argmax(-1)


def bench_reward(experts: compose.Experts, settings: SamplerSettings, seed: int) -> dict:
    task = DigitsTask("reward", "prior × log p(three | x̂0)", compose.reward_factors(experts), settings=settings)  # fmt: skip
    total = baselines.budget(task)
    out: dict[str, Any] = {"budget": total}
    for method in ("poegen", "fk", "best_of_k"):
        run = baselines.run(method, task, seed, total, dtype=torch.float32)
        out[method] = summary(
            run, judge_classes(experts.judge, run.particles), {compose.TARGET_DIGIT}
        )
    plain = baselines.run("summation", task, seed, total, dtype=torch.float32)
    out["plain"] = summary(
        plain, judge_classes(experts.judge, plain.particles), {compose.TARGET_DIGIT}
    )
    return out


def bench_product(experts: compose.Experts, settings: SamplerSettings, seed: int) -> dict:
    task = DigitsTask("product", "{0..4} prior × even prior", compose.product_factors(experts), settings=settings)  # fmt: skip
    total = baselines.budget(task)
    out: dict[str, Any] = {"budget": total}
    wanted = set(compose.PRODUCT_DIGITS)
    for method in ("poegen", "summation"):
        run = baselines.run(method, task, seed, total, dtype=torch.float32)
        out[method] = summary(run, judge_classes(experts.judge, run.particles), wanted)
    for name in ("flow-0to4", "flow-even"):
        alone = DigitsTask(name, name, (Factor(experts.flows[name], name=name),), settings=settings)
        run = baselines.run("summation", alone, seed, total, dtype=torch.float32)
        out[name + " alone"] = summary(run, judge_classes(experts.judge, run.particles), wanted)
    return out


def bench_completion(
    experts: compose.Experts, settings: SamplerSettings, seed: int, count: int
) -> dict:
    targets, labels = compose.held_out(count)
    per_method: dict[str, list[dict]] = {}
    for target, label in zip(targets, labels.tolist(), strict=True):
        task = DigitsTask("completion", "left half fixed", compose.completion_factors(experts, target), settings=settings)  # fmt: skip
        total = baselines.budget(task)
        for method in ("poegen", "fk", "best_of_k"):
            run = baselines.run(method, task, seed, total, dtype=torch.float32)
            per_method.setdefault(method, []).append(
                summary(run, judge_classes(experts.judge, run.particles), {label})
            )
    out: dict[str, Any] = {"digits": count, "labels": labels.tolist()}
    for method, rows in per_method.items():
        out[method] = {k: (sum(r[k] for r in rows) / len(rows)) for k in rows[0]} | {
            "seconds": round(sum(r["seconds"] for r in rows), 2)
        }
    return out


def table(results: dict) -> str:
    lines = [
        f"{'composition':<12} {'method':<16} {'share':>6} {'distinct':>9} {'evals':>8} {'s':>6}"
    ]
    for name in ("reward", "product", "completion"):
        for method, row in results[name].items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"{name:<12} {method:<16} {row['share']:6.3f} {row['distinct']:5.0f}/{row['returned']:<3.0f}"
                f" {row['evaluations']:8.0f} {row['seconds']:6.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="poegen digits benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer particles (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--completions", type=int, default=10, help="held-out digits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    experts = compose.load_experts()
    scale = 0.25 if args.quick else 1.0
    results: dict[str, Any] = {
        "settings": {
            name: s.model_dump()
            for name, s in compose.settings(scale).items()
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "processor": platform.processor() or platform.machine()},
    }  # fmt: skip
    results["provenance"] = provenance.stamp("digits")
    s = compose.settings(scale)
    results["reward"] = bench_reward(experts, s["reward"], args.seed)
    print(table({**results, "product": {}, "completion": {}}), flush=True)
    results["product"] = bench_product(experts, s["product"], args.seed)
    results["completion"] = bench_completion(
        experts, s["completion"], args.seed, max(2, int(args.completions * scale))
    )
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    print(f"total {results['seconds']}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
