"""The exact-target accuracy suite: poegen against its baselines at one expert-call budget.

Usage::

    .venv/bin/python bench/accuracy.py [--quick] [--tasks T1,T3] [--seeds K] [--out PATH]

Prints one table (per task: poegen's metrics, each baseline's, and the ratios poegen/baseline
of energy distance and mode TV, beside the noise floor of an exact sample of poegen's size) and
writes JSON to ``bench/results/accuracy.json`` (``accuracy_quick.json`` with ``--quick``).

Everything runs on the CPU in float64: the suite measures the algorithms, not rounding (the
analytic experts are exact in float64; float32 would add ~1e-7 relative noise, far below every
metric here, but the bitwise comparisons and log Z checks are cleaner in float64).

Metrics are those of :mod:`poegen.bench.metrics`, averaged over seeds (mean ± standard
deviation across seeds). Baselines and the budget are described in :mod:`poegen.bench.baselines`;
tasks in :mod:`poegen.bench.tasks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from poegen.bench import baselines, metrics, provenance
from poegen.bench.tasks import Task, build, task_names

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "poegen": "poegen",
    "euler": "Euler+MCMC",
    "fk_transition": "FK-SDE+MCMC",
    "summation": "summation",
    "best_of_k": "best-of-4",
    "fk": "FK",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one suite run."""

    seeds: int = 5
    num_particles: int | None = None  # None: each task's own
    num_steps: int | None = None
    reference_size: int = 8192
    floor_repeats: int = 20  # the floor's spread is about its mean (mode-count noise)
    quick: bool = False


FULL = Config()
QUICK = Config(
    seeds=1, num_particles=256, num_steps=50, reference_size=2048, floor_repeats=3, quick=True
)


def configure(task: Task, config: Config) -> Task:
    """The task with the config's particle and level counts."""
    update = {}
    if config.num_particles is not None:
        update["num_particles"] = config.num_particles
    if config.num_steps is not None:
        update["num_steps"] = config.num_steps
    return dataclasses.replace(task, settings=task.settings.model_copy(update=update))


def reference(task: Task, size: int, seed: int = 12345) -> metrics.Reference:
    """An exact sample of the target, with mode assignment and a sampler for floors."""
    return metrics.Reference(
        task.target.sample(size, torch.Generator().manual_seed(seed)),
        modes=task.target.assign,
        num_modes=int(task.target.component_weights.numel()),
        sampler=task.target.sample,
    )


def evaluate(task: Task, run: baselines.Run, ref: metrics.Reference) -> dict[str, float]:
    """Every metric of one run against the exact target."""
    x, log_w = run.particles, run.log_weights
    n = x.shape[0]
    out = {
        "n": float(n),
        "ess": metrics.kish_ess(log_w, n),
        "energy_distance": ref.energy_distance(x, log_w),
        "expected_floor": ref.self_term / metrics.kish_ess(log_w, n),
        "mode_tv": ref.mode_tv(x, log_w),
        "mode_mass_error": ref.mode_mass_error(x, log_w),
        "mean_error": metrics.mean_error(
            x, log_w, task.target.mean.reshape(-1), task.target.covariance
        ),
        "cov_error": metrics.cov_error(x, log_w, task.target.covariance),
        "evaluations": float(run.total_evaluations),
        "seconds": run.seconds,
    }
    if run.log_z_of_product:  # FK: log ∫ Π p_i^{w_i}·Π exp(λ r)·Π 1_C
        out["log_z_error"] = run.log_evidence - float(task.target.log_normalizer)
    elif task.rewards or task.constraints:
        out["log_z_error"] = run.log_evidence - task.exact_log_evidence
    if task.rewards:
        raw = sum(f.expert.log_potential(x).to(torch.float64) for f in task.rewards)
        out["reward"] = metrics.weighted_mean(raw, log_w)
    if task.constraints:
        inside = torch.stack([f.expert.log_potential(x) for f in task.constraints]).sum(0)
        out["violation_rate"] = metrics.violation_rate(inside, log_w)
        if run.best is not None:
            best = torch.stack([f.expert.log_potential(run.best[None]) for f in task.constraints])
            out["best_violates"] = float(torch.isneginf(best).any())
    return out


def _summary(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and standard error of the mean over seeds."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "se": math.nan}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "se": std / math.sqrt(len(finite))}


def run_task(
    task: Task,
    config: Config,
    log=print,
    keep: dict[str, baselines.Run] | None = None,
    runner=None,
) -> dict:
    """All applicable methods on one task over the config's seeds, with floors and ratios.

    ``keep``, if given, receives each method's first-seed :class:`~baselines.Run` (for plots).
    ``runner(method, task, seed, total) -> Run`` replaces :func:`baselines.run` (the demo runs
    the methods through a Sampler service).
    """
    started = time.perf_counter()
    ref = reference(task, config.reference_size)
    n = task.settings.num_particles
    floor = ref.noise_floor(
        n, repeats=config.floor_repeats, generator=torch.Generator().manual_seed(777)
    )
    total = baselines.budget(task)
    methods: dict[str, dict] = {}
    for method in baselines.applicable(task):
        per_seed = []
        for seed in range(config.seeds):
            run = (runner or baselines.run)(method, task, seed, total)
            if keep is not None and seed == 0:
                keep[method] = run
            per_seed.append(evaluate(task, run, ref) | {"num_particles": float(run.num_particles)})
        keys = per_seed[0].keys()
        methods[method] = {
            "summary": {k: _summary([s[k] for s in per_seed]) for k in keys},
            "per_seed": per_seed,
        }
    poe = methods["poegen"]["summary"]
    ratios = {
        m: {
            key: poe[key]["mean"] / methods[m]["summary"][key]["mean"]
            if methods[m]["summary"][key]["mean"] > 0
            else math.nan
            for key in ("energy_distance", "mode_tv")
        }
        for m in methods
        if m != "poegen"
    }
    result = {
        "description": task.description,
        "sample_shape": list(task.sample_shape),
        "budget": total,
        "settings": task.settings.model_dump(),
        "exact": {
            "log_evidence": task.exact_log_evidence,
            "reward": task.exact_reward,
            "component_weights": task.target.component_weights.tolist(),
        },
        "noise_floor": {
            "n": n,
            "expected_energy_distance": ref.self_term / n,  # E|Y − Y'|/n, exact in expectation
            "energy_distance": dataclasses.asdict(floor["energy_distance"]),
            "mode_tv": dataclasses.asdict(floor["mode_tv"]),
        },
        "methods": methods,
        "ratios": ratios,
        "seconds": time.perf_counter() - started,
    }
    log(f"# {task.name}: {result['seconds']:.1f}s", file=sys.stderr)
    return result


# --- the table -------------------------------------------------------------------------------

COLUMNS = (
    ("task", 8), ("method", 10), ("N", 6), ("evals", 8), ("ED", 17), ("ED floor", 8),
    ("mode TV", 13), ("TV floor", 8), ("max mode err", 12), ("mean err", 8), ("cov err", 8), ("logZ err", 14),
    ("E[r] (exact)", 16), ("viol", 5), ("ED ratio", 8), ("TV ratio", 8),
)  # fmt: skip


def _num(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits + 1}g}" if abs(value) < 10 else f"{value:.0f}"


def _pm(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    s = summary[key]
    if math.isnan(s["mean"]):
        return "-"
    se = s.get("se", 0.0)
    return f"{_num(s['mean'])}±{_num(se, 1)}" if se > 0 else _num(s["mean"])


def table_rows(name: str, result: dict) -> list[list[str]]:
    rows = []
    exact_r = result["exact"]["reward"]
    for i, (method, data) in enumerate(result["methods"].items()):
        s = data["summary"]
        ratio = result["ratios"].get(method, {})
        reward = "-"
        if "reward" in s:
            reward = f"{s['reward']['mean']:.3f} ({exact_r:.3f})"
        rows.append(
            [
                name if i == 0 else "",
                LABELS[method],
                f"{int(s['num_particles']['mean'])}",
                _num(s["evaluations"]["mean"]),
                _pm(s, "energy_distance"),
                _num(result["noise_floor"]["energy_distance"]["mean"]) if i == 0 else "",
                _pm(s, "mode_tv"),
                _num(result["noise_floor"]["mode_tv"]["mean"]) if i == 0 else "",
                _num(s["mode_mass_error"]["mean"]),
                _num(s["mean_error"]["mean"]),
                _num(s["cov_error"]["mean"]),
                _pm(s, "log_z_error"),
                reward,
                _num(s["violation_rate"]["mean"]) if "violation_rate" in s else "-",
                _num(ratio.get("energy_distance", math.nan)),
                _num(ratio.get("mode_tv", math.nan)),
            ]
        )
    return rows


def format_table(results: dict[str, dict]) -> str:
    """One fixed-width table over all tasks."""
    header = [c for c, _ in COLUMNS]
    rows = [row for name, res in results.items() for row in table_rows(name, res)]
    widths = [
        max(w, *(len(r[i]) for r in rows), len(header[i])) for i, (_, w) in enumerate(COLUMNS)
    ]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    notes = (
        "N: particles run (best-of-4 returns N/4 of them). evals: expert evaluations (particle x "
        "call), equal per task. ED: weighted energy distance to the exact target (V-statistic, "
        "mean±s.e. over seeds); floor: an exact sample of poegen's N. mode TV: total variation of "
        "mode weights; max mode err: the worst mode's mass error. Ratios: poegen / this baseline (< 1: poegen closer). logZ err: log Z_hat "
        "- log Z. viol: weighted constraint-violation rate."
    )
    return "\n".join([*out, "", notes])


# --- entry point -----------------------------------------------------------------------------


def run_suite(names: Sequence[str], config: Config, log=print) -> dict:
    results = {}
    for name in names:
        task = configure(build(name), config)
        results[name] = run_task(task, config, log=log)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed (~1 min)")
    parser.add_argument("--tasks", default=None, help="comma-separated: T1,T2,T3,T4,T5,T9 or names")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds: must be at least 1")
        config = dataclasses.replace(config, seeds=args.seeds)
    names = task_names(args.tasks)
    origin = provenance.stamp("accuracy")
    started = time.perf_counter()
    results = run_suite(names, config)
    elapsed = time.perf_counter() - started
    print(format_table(results))
    print(f"\n{len(names)} tasks, {config.seeds} seed(s), {elapsed:.0f}s")
    out = args.out or RESULTS / ("accuracy_quick.json" if config.quick else "accuracy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "provenance": origin,
        "config": dataclasses.asdict(config),
        "threads": args.threads,
        "seconds": elapsed,
        "tasks": results,
    }
    out.write_text(json.dumps(payload, indent=1, default=float, allow_nan=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
