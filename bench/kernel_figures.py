"""The figures that ``docs/sampler.md`` and the accuracy tests' docstrings quote, measured.

Each figure is a small run on an exact-target task of :mod:`poegen.bench.tasks`, with the
settings of the test that quotes it; the JSON keys are the ones the doc and the docstrings
cite (``bench/results/kernel_figures.json``)::

    python -m poegen.bench.kernel_figures [--out bench/results/kernel_figures.json]

* ``t1_ratio``: T1 energy distance poegen / summation at equal budget, seeds 0–7, N = 256,
  50 levels (``tests/bench/test_accuracy.py::test_t1_poegen_beats_summation_at_equal_budget``).
* ``t3_chain_law``: Z_q/Z of T3 without MCMC at 25, 50, 100 levels, q the law of the chain's
  output (200 000 particles): the Euler error Ẑ is unbiased for.
* ``t3_evidence``: Ẑ/Z on T3 over 16 seeds (N = 1024, 40 levels, 3 moves, ESS threshold 1),
  mean and standard error, with MALA and with ULA at c = 1.
* ``t4_das``: |E_W[r] − E[r]| on DAS's T4 targets, seeds 0–5, N = 2048, 50 levels, FK-style
  settings.
* ``moves_and_levels``: the default's energy distance on T1, P_d8 and T2_d8 (where it runs FK)
  as the moves go 5 → 20 and the levels 50 → 200, 3 seeds, beside the noise floor.
* ``t4_ring_floor``: T4_ring energy distance / noise floor, seeds 0–4, N = 512, 50 levels:
  resample-move with ULA (the default), with MALA, and moves on the generative product only
  (``mcmc_rewards=False``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from poegen.bench import accuracy, baselines, metrics, provenance, tasks
from poegen.kernel import SamplerSettings, sample

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_figures.json"
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small(task: tasks.Task, **update: Any) -> tasks.Task:
    return dataclasses.replace(task, settings=task.settings.model_copy(update=update))


def _mean_se(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=F64)
    return {"mean": float(t.mean()), "se": float(t.std() / math.sqrt(len(values)))}


def t1_ratio() -> dict[str, Any]:
    task = _small(tasks.t1(), num_particles=256, num_steps=50)
    ref = accuracy.reference(task, 2048)
    total = baselines.budget(task)
    ratios = []
    for seed in range(8):
        poe = baselines.run_poegen(task, seed=seed)
        summed = baselines.run_summation(task, seed=seed, total=total)
        ratios.append(
            ref.energy_distance(poe.particles, poe.log_weights)
            / ref.energy_distance(summed.particles)
        )
    return {"per_seed": ratios, "min": min(ratios), "max": max(ratios)}


def t3_chain_law() -> dict[str, float]:
    task = tasks.t3()
    out = {}
    for levels in (25, 50, 100):
        settings = SamplerSettings(
            num_particles=200_000, num_steps=levels, schedule="linear", mcmc_steps=0
        )
        chain = sample(task.generative, (2,), settings, generator=_gen(999), dtype=F64).particles
        reward = task.rewards[0].expert.log_potential(chain).to(F64)
        out[f"levels_{levels}"] = float(torch.exp(reward - task.exact_log_evidence).mean())
    return out


def t3_evidence() -> dict[str, Any]:
    task = tasks.t3()
    out = {}
    for mcmc in ("mala", "ula"):
        settings = SamplerSettings(
            num_particles=1024, num_steps=40, schedule="linear", mcmc_steps=3, step_size=1.0,
            ess_threshold=1.0, mcmc=mcmc,
        )  # fmt: skip
        ratios = [
            math.exp(
                sample(task.factors, (2,), settings, generator=_gen(s), dtype=F64).log_evidence
                - task.exact_log_evidence
            )
            for s in range(16)
        ]
        out[mcmc] = _mean_se(ratios)
    return out


def t4_das() -> dict[str, Any]:
    out = {}
    for name in ("T4_grid", "T4_ring"):
        task = tasks.build(name)
        settings = baselines.fk_settings(task, 2048).model_copy(update={"num_steps": 50})
        errors = []
        for seed in range(6):
            run = baselines.run_poegen(task, seed=seed, settings=settings)
            reward = task.rewards[0].expert.log_potential(run.particles).to(F64)
            errors.append(abs(metrics.weighted_mean(reward, run.log_weights) - task.exact_reward))
        out[name] = {"per_seed": errors, "max": max(errors)}
    return out


def t4_ring_floor() -> dict[str, Any]:
    task = _small(tasks.t4_ring(), num_particles=512, num_steps=50)
    ref = accuracy.reference(task, 2048)
    floor = ref.self_term / 512
    out = {}
    for label, update in (
        ("ula", {}),
        ("mala", {"mcmc": "mala"}),
        ("moves_first", {"mcmc_rewards": False}),
    ):
        variant = _small(task, **update)
        ratios = []
        for seed in range(5):
            # the kernel itself: moves-first evaluates rewards on another count than the
            # budget accounting of baselines.run_poegen assumes
            run = sample(
                variant.factors, variant.sample_shape, variant.settings, generator=_gen(seed),
                dtype=F64,
            )  # fmt: skip
            ratios.append(ref.energy_distance(run.particles, run.log_weights) / floor)
        out[label] = {"per_seed": ratios, "max": max(ratios)}
    return out


def moves_and_levels() -> dict[str, Any]:
    out: dict[str, Any] = {}
    grid = ((50, 5), (100, 5), (200, 5), (100, 10), (100, 20))
    for name in ("T1", "P_d8", "T2_d8"):
        task = tasks.build(name)
        ref = accuracy.reference(task, 8192)
        row: dict[str, Any] = {"floor": ref.self_term / task.settings.num_particles}
        for levels, moves in grid:
            variant = _small(task, num_steps=levels, mcmc_steps=moves)
            values = []
            for seed in range(3):
                run = baselines.run_poegen(variant, seed=seed)
                values.append(ref.energy_distance(run.particles, run.log_weights))
            row[f"levels_{levels}_moves_{moves}"] = _mean_se(values)
        out[name] = row
    return out


FIGURES = {
    "t1_ratio": t1_ratio,
    "t3_chain_law": t3_chain_law,
    "t3_evidence": t3_evidence,
    "t4_das": t4_das,
    "t4_ring_floor": t4_ring_floor,
    "moves_and_levels": moves_and_levels,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the figures docs/sampler.md quotes")
    parser.add_argument("--only", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [k for k in args.only.split(",") if k] or list(FIGURES)
    started = time.perf_counter()
    results: dict[str, Any] = {"provenance": provenance.stamp("kernel_figures")}
    for key in chosen:
        t = time.perf_counter()
        results[key] = FIGURES[key]()
        print(f"{key} ({time.perf_counter() - t:.0f}s): {json.dumps(results[key])}", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
