"""Dynamic batching on a tiny FLUX expert: concurrent small jobs against one large job.

Run ``.venv/bin/python -m poegen.bench.batching`` (``--quick`` for a smoke run). It builds a
tiny random-weight FLUX folder (:func:`poegen.expert_servers.flow.tiny.build_flux`) in a
temporary directory and starts two expert processes on it, as deployed::

    poegen serve flux --model DIR --port 0 --metrics-port 0 --option max_sequence_length=16 \\
        --batch-delay-ms 2                        # "on"; the other process omits the flag: "off"

Every job is :func:`poegen.kernel.sampler.sample` in its own thread of this process, with one
:class:`~poegen.kernel.remote.RemoteExpert` (the unconditioned model, so that all jobs share a
forward pass), deterministic Euler transitions and no MCMC: one Velocity call per level. The
figures, each the median of ``repeats`` interleaved runs:

* **throughput ratio** = (particle-levels per second of ``jobs`` = 8 concurrent jobs of
  ``particles`` = 16 on the "on" expert) / (the same of one job of 8 × 16 = 128 particles on
  the "off" expert). Target ≥ 0.9: batching should make many small jobs as cheap as one big
  one. The same ratio against the "off" expert is printed beside it (what batching buys).
* **latency ratio** = (wall time of one job of 16 particles, alone, on "on") / (the same on
  "off"), medians of ``3 × repeats`` interleaved runs. Target ≤ 1.05: a job alone on the host
  must not pay for batching.
* the calls and rows per forward pass the "on" expert served during the concurrent runs (its
  ``poegen_merged_batch_calls``/``_rows`` metrics).

Torch runs one intra-op thread in every process (``OMP_NUM_THREADS=1``): on a shared 2-core
box a second OpenMP team only adds noise. Sample shape (16, 8, 8) latents (16 image tokens),
16 text tokens. The JSON goes to ``bench/results/batching.json`` with the commit it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poegen.bench import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "batching.json"
SHAPE = (16, 8, 8)
TARGETS = {"throughput_ratio": 0.9, "latency_ratio": 1.05}
_SERVING = re.compile(r"poegen: serving \S+ on 127\.0\.0\.1:(\d+)$")
_METRICS = re.compile(r"poegen: metrics on 127\.0\.0\.1:(\d+)$")


@dataclass
class Expert:
    """One ``poegen serve flux`` process."""

    proc: subprocess.Popen[str]
    address: str
    metrics_port: int

    def samples(self) -> dict[str, float]:
        """The Velocity series of its merged-batch metrics, by sample name."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with opener.open(url, timeout=30) as reply:
            text = reply.read().decode()
        found = re.findall(r'^(poegen_merged_batch_\w+)\{method="Velocity"\} (\S+)$', text, re.M)
        return {name: float(value) for name, value in found if not name.endswith("_bucket")}


def serve_command(model: Path, delay_ms: float) -> list[str]:
    """The ``poegen serve flux`` command line of one expert (no flag when ``delay_ms`` is 0)."""
    command = [sys.executable, "-m", "poegen.clients.cli", "serve", "flux", "--model", str(model),
               "--port", "0", "--metrics-port", "0", "--option", "max_sequence_length=16"]  # fmt: skip
    return command + (["--batch-delay-ms", f"{delay_ms:g}"] if delay_ms > 0 else [])


def _start(model: Path, delay_ms: float, threads: int) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    return subprocess.Popen(
        serve_command(model, delay_ms),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _ready(proc: subprocess.Popen[str], timeout_s: float) -> Expert:
    """Wait for the process's two announcements, then for health SERVING (the model loaded)."""
    assert proc.stdout is not None
    port = metrics = None
    deadline = time.monotonic() + timeout_s
    while (port is None or metrics is None) and time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError("the expert process ended before it served")
        if m := _SERVING.match(line):
            port = int(m.group(1))
        elif m := _METRICS.match(line):
            metrics = int(m.group(1))
    if port is None or metrics is None:
        raise RuntimeError("the expert process did not announce its ports")
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return Expert(proc, address, metrics)
            time.sleep(0.05)
    raise RuntimeError("the expert did not load its model in time")


@contextlib.contextmanager
def experts(
    model: Path, delay_ms: float, threads: int = 1, timeout_s: float = 120
) -> Iterator[tuple[Expert, Expert]]:
    """The "on" and "off" experts (started together), stopped on exit."""
    procs = [_start(model, delay_ms, threads), _start(model, 0.0, threads)]
    try:
        on, off = (_ready(proc, timeout_s) for proc in procs)
        yield on, off
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_jobs(address: str, jobs: int, particles: int, levels: int, seed: int = 0) -> float:
    """Wall time of ``jobs`` concurrent jobs of ``particles`` particles and ``levels`` levels."""
    from poegen.kernel.remote import RemoteExpert
    from poegen.kernel.sampler import sample
    from poegen.kernel.spec import Factor, SamplerSettings

    settings = SamplerSettings(num_particles=particles, num_steps=levels, mcmc_steps=0)
    remotes = [RemoteExpert.connect(address, deadline_s=300) for _ in range(jobs)]
    start = threading.Barrier(jobs + 1)
    errors: list[BaseException] = []

    def job(index: int) -> None:
        generator = torch.Generator().manual_seed(seed + index)
        start.wait()
        try:
            sample([Factor(remotes[index])], SHAPE, settings, generator=generator)
        except BaseException as e:  # reported after the join
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    try:
        for t in threads:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
    finally:
        for remote in remotes:
            remote.close()
    if errors:
        raise errors[0]
    return wall


def measure(
    quick: bool = False,
    *,
    model: Path | None = None,
    jobs: int = 8,
    particles: int = 16,
    levels: int | None = None,
    repeats: int | None = None,
    delay_ms: float = 2.0,
    threads: int = 1,
) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return its figures.

    Args:
        quick: 4 levels and 1 repeat (instead of 20 and 5).
        model: a tiny FLUX folder to serve; ``None`` builds one in a temporary directory.
        jobs, particles: the concurrent jobs and their size; the single job has their product.
        levels, repeats: override the quick/full choice.
        delay_ms: the "on" expert's ``--batch-delay-ms``.
        threads: torch intra-op threads of the expert processes.
    """
    levels = levels or (4 if quick else 20)
    repeats = repeats or (1 if quick else 5)
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if model is None:
            from poegen.expert_servers.flow.tiny import build_flux

            model = build_flux(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "flux")
        on, off = stack.enter_context(experts(model, delay_ms, threads))
        for address in (on.address, off.address):  # warm-up: imports, first connections
            run_jobs(address, jobs, particles, 1)
            run_jobs(address, 1, particles, 1)
        walls: dict[str, list[float]] = {
            k: [] for k in ("concurrent_on", "concurrent_off", "single", "alone_on", "alone_off")
        }
        before = on.samples()
        for r in range(repeats):  # interleaved, so that drift in the machine's load hits all
            walls["concurrent_on"].append(run_jobs(on.address, jobs, particles, levels, r))
            walls["concurrent_off"].append(run_jobs(off.address, jobs, particles, levels, r))
            walls["single"].append(run_jobs(off.address, 1, jobs * particles, levels, r))
        after = on.samples()
        for r in range(3 * repeats):  # short runs: more of them, against the machine's noise
            walls["alone_on"].append(run_jobs(on.address, 1, particles, levels, r))
            walls["alone_off"].append(run_jobs(off.address, 1, particles, levels, r))
    result = _figures(walls, before, after, jobs, particles, levels, repeats, delay_ms)
    result["config"]["torch_threads"] = threads
    return result


def _figures(
    walls: dict[str, list[float]],
    before: dict[str, float],
    after: dict[str, float],
    jobs: int,
    particles: int,
    levels: int,
    repeats: int,
    delay_ms: float,
) -> dict[str, Any]:
    median = {k: statistics.median(v) for k, v in walls.items()}
    work = jobs * particles * levels  # particle-levels of one concurrent run (= the single job)
    throughput = {
        "concurrent_on": work / median["concurrent_on"],
        "concurrent_off": work / median["concurrent_off"],
        "single": work / median["single"],
    }

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    passes = delta("poegen_merged_batch_calls_count")
    return {
        "config": {"jobs": jobs, "particles": particles, "levels": levels, "repeats": repeats,
                   "batch_delay_ms": delay_ms, "sample_shape": list(SHAPE),
                   "model": "tiny FLUX (1+1 layers, 16 text tokens)", "torch_threads": 1},
        "wall_s": walls,
        "throughput_particle_levels_per_s": throughput,
        "throughput_ratio": throughput["concurrent_on"] / throughput["single"],
        "throughput_ratio_off": throughput["concurrent_off"] / throughput["single"],
        "latency_alone_s": {"on": median["alone_on"], "off": median["alone_off"]},
        "latency_ratio": median["alone_on"] / median["alone_off"],
        "merged": {
            "passes": passes,
            "calls_per_pass": delta("poegen_merged_batch_calls_sum") / passes if passes else 0.0,
            "rows_per_pass": delta("poegen_merged_batch_rows_sum") / passes if passes else 0.0,
        },
        "targets": TARGETS,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The figures as the printed table."""
    c, t = result["config"], result["throughput_particle_levels_per_s"]
    lat, merged = result["latency_alone_s"], result["merged"]
    n = c["jobs"] * c["particles"]
    lines = [
        f"tiny FLUX, {c['levels']} levels, median of {c['repeats']}, "
        f"--batch-delay-ms {c['batch_delay_ms']:g}",
        f"{'run':<42}{'particle-levels/s':>18}",
        f"{c['jobs']} jobs x {c['particles']} particles, batching on{'':<6}{t['concurrent_on']:>18.0f}",
        f"{c['jobs']} jobs x {c['particles']} particles, batching off{'':<5}{t['concurrent_off']:>18.0f}",
        f"1 job x {n} particles{'':<21}{t['single']:>18.0f}",
        f"throughput ratio (on / single)   {result['throughput_ratio']:6.3f}   target >= "
        f"{TARGETS['throughput_ratio']}",
        f"throughput ratio (off / single)  {result['throughput_ratio_off']:6.3f}",
        f"merged passes: {merged['calls_per_pass']:.2f} calls, {merged['rows_per_pass']:.1f} rows "
        f"per pass ({merged['passes']:.0f} passes)",
        f"1 job x {c['particles']} alone: on {lat['on']:.3f} s, off {lat['off']:.3f} s, "
        f"latency ratio {result['latency_ratio']:.3f}   target <= {TARGETS['latency_ratio']}",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="poegen dynamic-batching benchmark")
    parser.add_argument("--quick", action="store_true", help="4 levels, 1 repeat")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="--batch-delay-ms of 'on'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the experts")
    parser.add_argument("--model", type=Path, help="a tiny FLUX folder (default: build one)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--levels", type=int, help="default 20 (--quick: 4)")
    parser.add_argument("--repeats", type=int, help="default 5 (--quick: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    origin = provenance.stamp("batching")
    result = measure(
        args.quick,
        model=args.model,
        jobs=args.jobs,
        particles=args.particles,
        levels=args.levels,
        repeats=args.repeats,
        delay_ms=args.delay_ms,
        threads=args.threads,
    )
    print(table(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": origin, **result}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
