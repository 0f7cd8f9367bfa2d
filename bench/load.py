"""Load on a deployed stack: many small jobs at once, and a soak that watches memory.

Run ``.venv/bin/python bench/load.py`` (``--quick`` for a smoke run; ``--soak-minutes 30`` for
the soak). It starts a real local stack (``poegen serve analytic`` ×2 and ``poegen sampler``,
each its own process, through :class:`~poegen.clients.stack.LocalStack`), then:

1. **Concurrency** 1, 4, 16, 64: that many client threads each submit small jobs (16 particles,
   8 levels, 1 ULA move, a mixture × a linear reward) back to back for ``--seconds`` seconds,
   through the blocking SDK. Per level of concurrency: jobs done, errors by gRPC code (jobs
   beyond the Sampler's slots wait in its queue; beyond the queue they are RESOURCE_EXHAUSTED
   and counted, not retried), throughput, and job latency p50 / p95 / p99 (submit to result).
2. **Soak** (``--soak-minutes``, default 0: off): 4 client threads for that long; the resident
   memory of every stack process sampled every ``--soak-every`` seconds. Reports the curve and
   the growth from the first tenth of the run to the last tenth, per process.

The Sampler checkpoints every job after each level to a job store in a temporary folder, as
``poegen sampler`` on a fixed port does by default (``--job-store memory``: none), and the
soak also samples that folder's size (ended jobs are kept up to ``max_kept_jobs``).

The JSON goes to ``bench/results/load.json`` (with the commit it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import yaml

from poegen import Client, GenerationSpec, LocalStack
from poegen.bench import provenance
from poegen.clients.errors import GenerationError, PoegenError

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
MIX = {"means": [[-1.0, 0.0], [1.0, 0.0]], "covariances": [[0.2, 0.2], [0.2, 0.2]],
       "weights": [0.5, 0.5], "name": "mix"}  # fmt: skip
REWARD = {"direction": [1.0, 0.0], "name": "right"}


def _stack(max_jobs: int, max_queued: int, job_store: Path | None = None) -> dict[str, Any]:
    sampler: dict[str, Any] = {"max_jobs": max_jobs, "max_queued": max_queued}
    if job_store is not None:
        sampler["job_store"] = str(job_store)
    return {
        "experts": [
            {"name": "mix", "expert": "gaussian_mixture", "params": MIX},
            {"name": "right", "expert": "linear_reward", "params": REWARD},
        ],
        "sampler": sampler,
        "env": {"OMP_NUM_THREADS": "1"},
    }


def _spec(seed: int) -> GenerationSpec:
    return GenerationSpec.from_mapping(
        {
            "seed": seed,
            "settings": {"num_particles": 16, "num_steps": 8, "mcmc_steps": 1},
            "experts": [{"endpoint": "mix"}, {"endpoint": "right", "weight": 1.0}],
            "output": {"decode": "none"},
        }
    )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(stack: LocalStack, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads submitting jobs back to back for ``seconds``."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        with Client.from_stack(stack) as client:
            seed = index * 1_000_000
            while time.monotonic() < stop_at:
                seed += 1
                start = time.monotonic()
                try:
                    client.generate(_spec(seed), timeout=120)
                except GenerationError as e:
                    with lock:
                        errors[e.code.name] += 1
                    time.sleep(0.05)  # a refused client backs off a little
                    continue
                except PoegenError as e:
                    with lock:
                        errors[type(e).__name__] += 1
                    continue
                with lock:
                    latencies.append(time.monotonic() - start)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {
        "clients": clients,
        "jobs": len(latencies),
        "errors": dict(errors),
        "jobs_per_s": len(latencies) / wall,
        "p50_s": _percentile(latencies, 0.50),
        "p95_s": _percentile(latencies, 0.95),
        "p99_s": _percentile(latencies, 0.99),
        "wall_s": wall,
    }


def _processes(stack: LocalStack) -> dict[str, psutil.Process]:
    return {p.name: psutil.Process(p.proc.pid) for p in stack.processes}


def _folder_mib(folder: Path | None) -> float:
    """The size of the files under ``folder`` (jobs come and go while it is read)."""
    if folder is None:
        return 0.0
    total = 0
    for parent, _, files in os.walk(folder):  # a folder removed meanwhile is skipped
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total / 2**20


def soak(
    stack: LocalStack, minutes: float, every_s: float, job_store: Path | None = None
) -> dict[str, Any]:
    processes = _processes(stack)
    curve: list[dict[str, float]] = []
    done = threading.Event()
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(drive(stack, 4, minutes * 60))
        done.set()

    threading.Thread(target=load, daemon=True).start()
    start = time.monotonic()
    while not done.wait(every_s):
        point = {"t_s": time.monotonic() - start}
        point.update({name: p.memory_info().rss / 2**20 for name, p in processes.items()})
        point["job_store_mib"] = _folder_mib(job_store)
        curve.append(point)
        print(f"  soak t={point['t_s']:.0f}s " + " ".join(
            f"{n}={point[n]:.0f}MiB" for n in processes), flush=True)  # fmt: skip
    tenth = max(1, len(curve) // 10)
    growth = {
        name: statistics.mean(c[name] for c in curve[-tenth:])
        - statistics.mean(c[name] for c in curve[:tenth])
        for name in processes
    } if curve else {}  # fmt: skip
    return {"minutes": minutes, "load": result, "rss_mib": curve, "growth_mib": growth}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="poegen load benchmark")
    parser.add_argument("--quick", action="store_true", help="3 s per level, 1/4/16 clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--soak-every", type=float, default=10.0)
    parser.add_argument("--max-jobs", type=int, default=4)
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--job-store", choices=("directory", "memory"), default="directory",
        help="the Sampler's job store: a temporary folder (checkpoints) or memory",
    )  # fmt: skip
    args = parser.parse_args(argv)
    levels = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    seconds = 3.0 if args.quick else args.seconds
    out: dict[str, Any] = {
        "provenance": provenance.stamp("load"),
        "config": {"max_jobs": args.max_jobs, "max_queued": args.max_queued,
                   "seconds": seconds, "job": "16 particles, 8 levels, 1 ULA move",
                   "job_store": args.job_store},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stack.yaml"
        store = Path(tmp) / "jobs" if args.job_store == "directory" else None
        path.write_text(yaml.safe_dump(_stack(args.max_jobs, args.max_queued, store)))
        with LocalStack.from_yaml(path) as stack:
            drive(stack, 1, 1.0)  # warm-up: imports, first connections
            out["concurrency"] = []
            print("clients  jobs  errors                   jobs/s    p50     p95     p99")
            for clients in levels:
                row = drive(stack, clients, seconds)
                out["concurrency"].append(row)
                print(f"{clients:>7} {row['jobs']:>5}  {json.dumps(row['errors']):<22} "
                      f"{row['jobs_per_s']:7.1f} {row['p50_s'] or 0:7.3f} "
                      f"{row['p95_s'] or 0:7.3f} {row['p99_s'] or 0:7.3f}", flush=True)  # fmt: skip
            if args.soak_minutes > 0:
                out["soak"] = soak(stack, args.soak_minutes, args.soak_every, store)
                print("soak growth (MiB, last tenth - first tenth):", out["soak"]["growth_mib"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
