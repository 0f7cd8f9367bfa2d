"""Transport overhead of remote experts, and the cost of calling three at once.

Run ``.venv/bin/python bench/transport.py`` (``--quick`` for a smoke run). It prints a table
and writes ``bench/results/transport.json``.

What it measures, in one run:

1. **Transport ratio** = (median time of one ``RemoteExpert.velocity`` call) / (median time
   of the same call on the same expert in-process), for latent batches from 1×16×64×64 to
   8×16×128×128 in float32, float16 and bfloat16, over TCP loopback and over shared memory
   (request tensors through POSIX shared memory, replies inline: see
   :mod:`poegen.kernel.codec`). The expert's compute time is FIXED (``--delay-ms``, 50 ms by
   default, a ``time.sleep`` standing in for GPU time, which leaves the CPU free as a CUDA
   sync does) plus one elementwise op, so the ratio is 1 + transport overhead / 50 ms.
   Targets: ≤ 1.20 over TCP, ≤ 1.05 with shared memory.
2. **Concurrency ratio** = median level time of the sampler with three remote experts whose
   compute times are 40, 45 and 50 ms, over the level time with the slowest alone (both
   ``sample()`` with ``mcmc_steps=0``: one round of velocity calls per level). Target ≤ 1.10.

The experts run in separate processes (this script re-executed with ``--serve MS``), as
deployed: encode/decode on the two sides do not share a GIL. The in-process baseline calls the
expert directly. Times are medians of ``--repeats`` calls after one warm-up call; on a loaded
machine rerun before drawing conclusions. Torch runs one intra-op thread in every process
(the fixed compute is the sleep; OpenMP spinning on an oversubscribed box only adds noise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.kernel.experts import ExpertInfo, ExpertKind
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings

SIZES = ((1, 16, 64, 64), (4, 16, 64, 64), (2, 16, 128, 128), (8, 16, 128, 128))
QUICK_SIZES = ((1, 16, 64, 64), (8, 16, 128, 128))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CONCURRENT_DELAYS_MS = (40.0, 45.0, 50.0)
RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
TARGETS = {"tcp": 1.20, "shm": 1.05, "concurrency": 1.10}


class FixedCostExpert:
    """A generative expert whose every call takes ``delay_s`` plus ``0.5·x``: fixed compute."""

    def __init__(self, delay_s: float, name: str = "fixed") -> None:
        self.delay_s = delay_s
        self.name = name

    def describe(self) -> ExpertInfo:
        return ExpertInfo(name=self.name, kind=ExpertKind.GENERATIVE, model_id="bench")

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return x * 0.5


# --------------------------------------------------------------------------- servers


def _serve(delay_ms: float) -> int:
    """Child mode: serve a FixedCostExpert (shared memory accepted) until SIGTERM."""
    torch.set_num_threads(1)
    from poegen.expert_servers.server import ServerConfig
    from poegen.expert_servers.server.server import serve

    config = ServerConfig(port=0, shared_memory=True, grace_s=1.0, workers=4)
    expert = FixedCostExpert(delay_ms / 1000, name=f"fixed{delay_ms:g}")
    return asyncio.run(
        serve(config, expert=expert, name=expert.name, announce=lambda s: print(s, flush=True))
    )


def _spawn(delay_ms: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(delay_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("poegen: serving"):
            return proc, line.split(" on ")[-1].strip()
    proc.kill()
    raise RuntimeError("expert server did not start")


# --------------------------------------------------------------------------- timing


def _median_ms(call: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
    call(*args)  # warm-up: connection, allocator, first-call paths
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def transport_rows(
    address: str, delay_s: float, sizes: Sequence[tuple[int, ...]], repeats: int
) -> list[dict[str, Any]]:
    local = FixedCostExpert(delay_s)
    rows = []
    with (
        RemoteExpert.connect(address) as tcp,
        RemoteExpert.connect(address, shared_memory=True) as shm,
    ):
        if not shm.uses_shared_memory:
            raise RuntimeError("shared memory was not negotiated")
        for shape in sizes:
            for dtype_name, dtype in DTYPES.items():
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
                sigma = torch.full((shape[0],), 0.5, dtype=dtype)
                ms = {
                    name: _median_ms(expert.velocity, (x, sigma), repeats)
                    for name, expert in (("in_process", local), ("tcp", tcp), ("shm", shm))
                }
                rows.append(
                    {
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "mib": x.numel() * x.element_size() / 2**20,
                        "ms": ms,
                        "tcp_ratio": ms["tcp"] / ms["in_process"],
                        "shm_ratio": ms["shm"] / ms["in_process"],
                    }
                )
    return rows


def concurrency(
    addresses: Sequence[str], slowest: str, shape: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    settings = SamplerSettings(num_particles=shape[0], num_steps=repeats + 2, mcmc_steps=0)

    def level_ms(addrs: Sequence[str]) -> float:
        experts = [RemoteExpert.connect(a) for a in addrs]
        try:
            result = sample(
                [Factor(e, weight=1 / len(experts)) for e in experts], shape[1:], settings,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        finally:
            for e in experts:
                e.close()
        # level 0 also pays the initial evaluation; the last level may be σ → 0 specific
        return statistics.median(t.seconds for t in result.trace[1:]) * 1000

    three = level_ms(addresses)
    alone = level_ms([slowest])
    return {
        "delays_ms": list(CONCURRENT_DELAYS_MS),
        "shape": list(shape),
        "three_ms": three,
        "slowest_alone_ms": alone,
        "ratio": three / alone,
    }


# --------------------------------------------------------------------------- report


def _table(rows: list[dict[str, Any]], conc: dict[str, Any], delay_ms: float) -> str:
    head = (
        f"remote / in-process time per velocity call (expert compute fixed at {delay_ms:g} ms; "
        f"targets: tcp <= {TARGETS['tcp']}, shm <= {TARGETS['shm']})"
    )
    lines = [
        head,
        f"{'batch':<16}{'dtype':<6}{'MiB':>7}{'local ms':>10}{'tcp ms':>9}{'tcp x':>8}"
        f"{'shm ms':>9}{'shm x':>8}",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<16}{r['dtype']:<6}{r['mib']:>7.2f}"
            f"{ms['in_process']:>10.1f}{ms['tcp']:>9.1f}{r['tcp_ratio']:>8.3f}"
            f"{ms['shm']:>9.1f}{r['shm_ratio']:>8.3f}"
        )
    delays = "/".join(f"{d:g}" for d in conc["delays_ms"])
    lines.append(
        f"3 concurrent experts ({delays} ms, batch {'x'.join(map(str, conc['shape']))} f32): "
        f"level {conc['three_ms']:.1f} ms vs slowest alone {conc['slowest_alone_ms']:.1f} ms, "
        f"ratio {conc['ratio']:.3f} (target <= {TARGETS['concurrency']})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="fixed expert compute")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return _serve(args.serve)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # same on both sides; OpenMP on a busy 2-core box only adds noise
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = QUICK_SIZES if args.quick else SIZES
    started = time.perf_counter()
    delays = sorted({args.delay_ms, *CONCURRENT_DELAYS_MS})
    servers = {d: _spawn(d) for d in delays}
    try:
        main_address = servers[args.delay_ms][1]
        rows = transport_rows(main_address, args.delay_ms / 1000, sizes, repeats)
        conc = concurrency(
            [servers[d][1] for d in CONCURRENT_DELAYS_MS],
            servers[max(CONCURRENT_DELAYS_MS)][1],
            (4, 16, 64, 64),
            repeats,
        )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(10)
    table = _table(rows, conc, args.delay_ms)
    print(table)
    worst = {k: max(r[f"{k}_ratio"] for r in rows) for k in ("tcp", "shm")}
    print(
        f"worst: tcp {worst['tcp']:.3f}, shm {worst['shm']:.3f}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    report = {
        "delay_ms": args.delay_ms,
        "repeats": repeats,
        "targets": TARGETS,
        "rows": rows,
        "concurrency": conc,
        "worst": worst,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": _cpus(), "platform": platform.platform()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


__all__ = ["FixedCostExpert", "concurrency", "main", "transport_rows"]

if __name__ == "__main__":
    sys.exit(main())
