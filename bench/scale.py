"""Scale-out: one expert served by 1, 2, 4, 8 replicas, and the cost model that predicts it.

Run ``.venv/bin/python bench/scale.py`` (``--quick`` for a smoke run on tiny sizes). It starts
``max(--replicas)`` replica processes of :class:`~poegen.bench.slow_expert.SlowGaussian` (an
expert sleeping a fixed time per sample: GPU time without the GPU) and the Sampler service in
this process, then:

1. **Call time**: the median wall time of one ``Velocity`` call of a full chunk (``--batch``
   samples) on one replica, through :class:`~poegen.kernel.remote.RemoteExpert`.
2. **Throughput**: for r in ``--replicas``, ``--jobs`` jobs one after the other against the
   target ``ipv4:`` listing the first r replicas (:mod:`poegen.kernel.replicas`); jobs per
   second, the ratio to r = 1 and its share of linear (target ≥ 0.9), and the cost model per
   job (one expert: ``E = 1``)

       evaluations × E × ⌈particles / (r · batch)⌉ × call time,
       evaluations = 1 + (levels − 1) × (moves + 1)  ≈  levels × (moves + 1)

   (the kernel evaluates the experts once at σ = 1, then once per transition and per move at
   each later level) printed beside the measured job time. The model calls the jobs' level
   events count are checked against ``evaluations × E × ⌈particles / batch⌉``.
3. **A replica killed mid-run**: the same jobs against all replicas, one replica SIGKILLed
   during the first job; failed jobs (target 0) and whether every result equals the
   undisturbed run's bit for bit.

The JSON goes to ``bench/results/scale.json`` (``--out``), stamped with the commit it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from poegen.bench import batching, provenance
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.replicas import connect_expert
from poegen.kernel.service import SamplerServerConfig, create_sampler_server
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "scale.json"


@dataclass(frozen=True, slots=True)
class Sizes:
    """One run's sizes: replicas to compare, the job, the replicas' latency."""

    replicas: tuple[int, ...] = (1, 2, 4, 8)
    particles: int = 32
    batch: int = 4  # the replicas' max_batch: the chunk size
    levels: int = 8
    moves: int = 1
    jobs: int = 3
    per_sample_s: float = 0.025  # a chunk of 4: 0.1 s, still quicker than a GPU's FLUX step
    call_repeats: int = 20  # calls timed for the call time

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            replicas=(1, 2), particles=4, batch=2, levels=3, jobs=2, per_sample_s=0.002,
            call_repeats=5,
        )  # fmt: skip


def evaluations(sizes: Sizes) -> int:
    """Expert evaluations of one job: once at σ = 1, then (moves + 1) at each later level."""
    return 1 + (sizes.levels - 1) * (sizes.moves + 1)


def predicted_job_s(sizes: Sizes, replicas: int, call_s: float, experts: int = 1) -> float:
    """evaluations × experts × ⌈particles / (replicas·batch)⌉ × call time."""
    rounds = math.ceil(sizes.particles / (replicas * sizes.batch))
    return evaluations(sizes) * experts * rounds * call_s


# ------------------------------------------------------------------ processes


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@contextmanager
def replicas(n: int, sizes: Sizes) -> Iterator[list[Replica]]:
    """``n`` replica processes, started together; killed on exit."""
    args = [sys.executable, "-m", "poegen.bench.slow_expert", "--port", "0",
            "--per-sample-s", str(sizes.per_sample_s), "--max-batch", str(sizes.batch)]  # fmt: skip
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    started: list[Replica] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()  # "poegen: serving slow on 127.0.0.1:PORT"
            if not line.startswith("poegen: serving slow on 127.0.0.1:"):
                raise RuntimeError(f"a replica did not start: {line!r}")
            started.append(Replica(proc, int(line.rsplit(":", 1)[1])))
        yield started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@contextmanager
def sampler_service() -> Iterator[str]:
    """The Sampler service on an event loop of its own thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def start() -> tuple[Any, int]:
        host, port = create_sampler_server(SamplerServerConfig())
        await host.start()
        return host, port

    host, port = run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        run(host.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def target(members: Sequence[Replica]) -> str:
    return "ipv4:" + ",".join(r.address for r in members)


# ------------------------------------------------------------------ measurements


def request(address: str, sizes: Sizes, seed: int) -> sampler_pb2.GenerateRequest:
    settings = sampler_pb2.SamplerSettings(
        num_particles=sizes.particles, num_steps=sizes.levels, mcmc_steps=sizes.moves
    )
    factor = sampler_pb2.FactorSpec(address=address, weight=1.0)
    return sampler_pb2.GenerateRequest(
        factors=[factor], sample_shape=[2], settings=settings, seed=seed
    )


@dataclass
class JobOutcome:
    seconds: float
    calls: int  # model calls the job's level events count
    result: sampler_pb2.GenerateResult | None
    error: str = ""


def run_job(
    stub: sampler_pb2_grpc.SamplerServiceStub,
    req: sampler_pb2.GenerateRequest,
    on_level: Callable[[int], None] | None = None,
) -> JobOutcome:
    start = time.perf_counter()
    calls, result = 0, None
    try:
        for reply in stub.Generate(req, timeout=600):
            if reply.HasField("level"):
                calls += sum(t.calls for t in reply.level.timings)
                if on_level is not None:
                    on_level(reply.level.step)
            else:
                result = reply.result
    except grpc.RpcError as e:
        return JobOutcome(time.perf_counter() - start, calls, None, e.code().name)
    return JobOutcome(time.perf_counter() - start, calls, result)


def call_time(replica: Replica, sizes: Sizes, repeats: int) -> float:
    """Median seconds of one Velocity call of a full chunk on one replica."""
    x, sigma = torch.randn(sizes.batch, 2), torch.full((sizes.batch,), 0.5)
    with RemoteExpert.connect(replica.address) as expert:
        expert.velocity(x, sigma)  # the channel's first call connects
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            expert.velocity(x, sigma)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def connect_time(members: Sequence[Replica], repeats: int) -> float:
    """Median seconds to connect to (Describe) and close the replicas, as each job does."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with connect_expert(target(members)):
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _comparable(result: sampler_pb2.GenerateResult | None) -> bytes:
    """The result less its expert records (their revisions name host processes)."""
    if result is None:
        return b""
    out = sampler_pb2.GenerateResult()
    out.CopyFrom(result)
    del out.experts[:]
    return out.SerializeToString(deterministic=True)


def throughput(
    stub: sampler_pb2_grpc.SamplerServiceStub, started: Sequence[Replica], sizes: Sizes
) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """``sizes.jobs`` jobs, one at a time, on the first r replicas for each r: a row per r,
    and the results. Interleaved (job s on every r, then job s + 1), so a spell of load on a
    shared machine slows every r alike instead of one."""
    counts = sizes.replicas
    for r in counts:
        run_job(stub, request(target(started[:r]), sizes, seed=10_000))  # warm: channels, threads
    outcomes: dict[int, list[JobOutcome]] = {r: [] for r in counts}
    for seed in range(sizes.jobs):
        for r in counts:
            outcomes[r].append(run_job(stub, request(target(started[:r]), sizes, seed=seed)))
    rows = []
    for r in counts:
        wall = sum(o.seconds for o in outcomes[r])
        rows.append({
            "replicas": r,
            "jobs": len(outcomes[r]),
            "failed": sum(1 for o in outcomes[r] if o.error),
            "job_s": wall / len(outcomes[r]),
            "jobs_per_s": len(outcomes[r]) / wall,
            "calls_per_job": outcomes[r][0].calls,
            "connect_s": connect_time(started[:r], repeats=5),
        })  # fmt: skip
    return rows, {r: [_comparable(o.result) for o in outcomes[r]] for r in counts}


def killed_mid_run(
    stub: sampler_pb2_grpc.SamplerServiceStub,
    members: Sequence[Replica],
    sizes: Sizes,
    undisturbed: list[bytes],
) -> dict[str, Any]:
    """The same jobs, the last replica SIGKILLed at the first job's second level."""
    victim = members[-1]

    def kill_once(step: int) -> None:
        if step >= 1 and victim.proc.poll() is None:
            victim.kill()

    outcomes = [
        run_job(stub, request(target(members), sizes, seed=s), kill_once if s == 0 else None)
        for s in range(sizes.jobs)
    ]
    return {
        "replicas": len(members),
        "killed": victim.address,
        "jobs": len(outcomes),
        "failed_jobs": sum(1 for o in outcomes if o.error),
        "errors": [o.error for o in outcomes if o.error],
        "identical_to_undisturbed": [_comparable(o.result) for o in outcomes] == undisturbed,
        "job_s": statistics.mean(o.seconds for o in outcomes),
    }


def measure_replicas(sizes: Sizes) -> dict[str, Any]:
    """Call time, throughput per replica count with the cost model, and a kill mid-run."""
    most = max(sizes.replicas)
    with replicas(most, sizes) as started, sampler_service() as address:
        call_s = call_time(started[0], sizes, repeats=sizes.call_repeats)
        with grpc.insecure_channel(address) as channel:
            stub = sampler_pb2_grpc.SamplerServiceStub(channel)
            rows, results = throughput(stub, started, sizes)
            killed = killed_mid_run(stub, started, sizes, results[most])
    base = rows[0]["jobs_per_s"] / rows[0]["replicas"]
    calls = evaluations(sizes) * math.ceil(sizes.particles / sizes.batch)
    for row in rows:
        r = row["replicas"]
        row["speedup"] = row["jobs_per_s"] / rows[0]["jobs_per_s"]
        row["of_linear"] = row["jobs_per_s"] / (base * r)
        row["predicted_job_s"] = predicted_job_s(sizes, r, call_s)
        row["measured_over_predicted"] = row["job_s"] / row["predicted_job_s"]
        row["overhead_s"] = row["job_s"] - row["predicted_job_s"]  # connect, kernel, transport
        row["calls_predicted"] = calls
        row["identical_to_one_replica"] = results[r] == results[sizes.replicas[0]]
    return {
        "sizes": {k: getattr(sizes, k) for k in Sizes.__dataclass_fields__},
        "call_s": call_s,
        "throughput": rows,
        "killed_mid_run": killed,
    }


def measure(quick: bool) -> dict[str, Any]:
    """Every figure of the benchmark (``quick``: tiny sizes)."""
    out: dict[str, Any] = {"provenance": provenance.stamp("scale")}
    out["replicas"] = measure_replicas(Sizes.quick() if quick else Sizes())
    out["dynamic_batching"] = batching.measure(quick)
    return out


def print_replicas(figures: dict[str, Any]) -> None:
    print(f"call time (one chunk of {figures['sizes']['batch']}): {figures['call_s'] * 1e3:.1f} ms")
    print("replicas  jobs/s  speedup  of linear  job s  predicted s  measured/predicted  "
          "overhead s  connect s  calls (model)  identical")  # fmt: skip
    for row in figures["throughput"]:
        print(f"{row['replicas']:>8} {row['jobs_per_s']:7.2f} {row['speedup']:8.2f} "
              f"{row['of_linear']:10.1%} {row['job_s']:6.3f} {row['predicted_job_s']:12.3f} "
              f"{row['measured_over_predicted']:19.2f} {row['overhead_s']:11.3f} "
              f"{row['connect_s']:10.3f} {row['calls_per_job']:>6} "
              f"({row['calls_predicted']})  {row['identical_to_one_replica']}")  # fmt: skip
    k = figures["killed_mid_run"]
    print(f"one of {k['replicas']} replicas killed mid-run: {k['failed_jobs']} of {k['jobs']} "
          f"jobs failed; results identical to the undisturbed run: "
          f"{k['identical_to_undisturbed']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="poegen scale-out benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out = measure(args.quick)
    print_replicas(out["replicas"])
    print(batching.table(out["dynamic_batching"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
