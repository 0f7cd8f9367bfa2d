"""Transport overhead of remote experts, and the cost of calling three at once.

Run ``.venv/bin/python bench/transport.py`` (``--quick`` for a smoke run, ``--no-scaled`` to
skip the second table). It prints the tables and writes ``bench/results/transport.json``.

What it measures, in one run:

1. **Transport ratio** = (median time of one ``RemoteExpert.velocity`` call) / (median time
   of the same call on the same expert in-process), for latent batches from 1×16×64×64 to
   8×16×128×128 in float32, float16 and bfloat16, over TCP loopback and over shared memory
   (request tensors through POSIX shared memory, and the reply written by the server into a
   room the client offers: see :mod:`poegen.kernel.codec`). The expert's compute time is
   FIXED (``--delay-ms``, 50 ms by default, a ``time.sleep`` standing in for GPU time, which
   leaves the CPU free as a CUDA sync does) plus one elementwise op, so the ratio is
   1 + transport overhead / 50 ms. Targets: ≤ 1.20 over TCP, ≤ 1.05 with shared memory.
   Two floors, measured in the same run, say what this machine allows:

   * ``floor``: what gRPC itself costs: the same bytes each way through a bare ``grpc.aio``
     echo server (no protobuf, no validation) whose handler sleeps the same time in a worker
     thread. No transport built on gRPC can beat it.
   * ``raw``: what any TCP transport costs: the same bytes each way over a plain loopback
     socket (length prefix, ``sendall``/``recv_into`` into a buffer reused across calls, no
     framing beyond that) to a blocking server thread that sleeps the same time. Only the
     kernel's copies and two wake-ups remain; on a machine whose loopback moves about
     1.5 GB/s, 8 MiB each way is already ~10 ms, a fifth of the 50 ms budget.

   The shared-memory path cannot fall below one bare gRPC call (its control message is one;
   ``floor`` at the smallest sizes is about that) plus the copies into and out of the
   segments that a receiver must make (it never keeps a view of memory its peer can
   truncate, which would crash it: see :mod:`poegen.kernel.codec`).
2. **Scaled compute** (second table, f32): the same ratios when the compute time grows with
   the batch as a real model's step does, ``--scaled-ms`` (50) per 16×64×64 sample of latent
   elements (so 8×16×128×128 computes for 1.6 s). Transport cost grows with the bytes too, so
   this is the ratio a deployment sees; the fixed-compute table is the issue's stress test,
   where a 16× larger batch is moved in the same 50 ms.
3. **Concurrency ratio** = median level time of the sampler with three remote experts whose
   compute times are 40, 45 and 50 ms, over the level time with the slowest alone (both
   ``sample()`` with ``mcmc_steps=0``: one round of velocity calls per level). Target ≤ 1.10.

The experts run in separate processes (this script re-executed with ``--serve MS``), as
deployed: encode/decode on the two sides do not share a GIL. The in-process baseline calls the
expert directly. Every process tunes its allocator as ``poegen serve`` does
(:func:`poegen.kernel.transport.tune_allocator`). Times are medians of ``--repeats`` calls
after one warm-up call; on a loaded machine rerun before drawing conclusions. Torch runs one
intra-op thread in every process (the fixed compute is the sleep; OpenMP spinning on an
oversubscribed box only adds noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

from poegen.kernel.experts import ExpertInfo, ExpertKind
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.kernel.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options, tune_allocator

SIZES = ((1, 16, 64, 64), (4, 16, 64, 64), (2, 16, 128, 128), (8, 16, 128, 128))
QUICK_SIZES = ((1, 16, 64, 64), (8, 16, 128, 128))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CONCURRENT_DELAYS_MS = (40.0, 45.0, 50.0)
RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
TARGETS = {"tcp": 1.20, "shm": 1.05, "concurrency": 1.10}


SAMPLE_ELEMENTS = 16 * 64 * 64  # the unit of the scaled compute time


class FixedCostExpert:
    """A generative expert whose every call takes ``delay_s`` plus ``0.5·x``: fixed compute.

    With ``scaled=True`` the delay is per :data:`SAMPLE_ELEMENTS` latent elements of the batch.
    """

    def __init__(self, delay_s: float, name: str = "fixed", *, scaled: bool = False) -> None:
        self.delay_s = delay_s
        self.name = name
        self.scaled = scaled

    def describe(self) -> ExpertInfo:
        return ExpertInfo(name=self.name, kind=ExpertKind.GENERATIVE, model_id="bench")

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        time.sleep(self.delay_s * (x.numel() / SAMPLE_ELEMENTS if self.scaled else 1.0))
        return x * 0.5


# --------------------------------------------------------------------------- servers


def _serve(delay_ms: float, mode: str) -> int:
    """Child mode: serve a FixedCostExpert (shared memory accepted), the bare gRPC echo of
    the floor column, or the plain socket echo of the raw column, until SIGTERM."""
    torch.set_num_threads(1)
    if mode == "floor":
        return asyncio.run(_serve_floor(delay_ms / 1000))
    if mode == "raw":
        return _serve_raw(delay_ms / 1000)
    from poegen.expert_servers.server import ServerConfig
    from poegen.expert_servers.server.server import serve

    config = ServerConfig(port=0, shared_memory=True, grace_s=1.0, workers=4)
    expert = FixedCostExpert(delay_ms / 1000, name=f"fixed{delay_ms:g}", scaled=mode == "scaled")
    return asyncio.run(
        serve(config, expert=expert, name=expert.name, announce=lambda s: print(s, flush=True))
    )


def _identity(data: bytes) -> bytes:
    return data


async def _serve_floor(delay_s: float) -> int:
    """A bare grpc.aio echo of raw bytes, sleeping ``delay_s`` in a worker thread first."""
    tune_allocator()
    executor = ThreadPoolExecutor(4)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.get_running_loop().run_in_executor(executor, time.sleep, delay_s)
        return request

    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=_identity, response_serializer=_identity
    )
    server = grpc.aio.server(options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("Floor", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"poegen: serving floor on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()
    return 0


def _serve_raw(delay_s: float) -> int:
    """A plain TCP echo: an 8-byte length, then the bytes; sleeps ``delay_s``, sends them
    back. One blocking thread per connection."""
    server = socket.create_server(("127.0.0.1", 0))
    print(f"poegen: serving raw on 127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_raw_echo, args=(conn, delay_s), daemon=True).start()


def _raw_echo(conn: socket.socket, delay_s: float) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    with conn:
        while True:
            head = bytearray(8)
            if not _recv_exactly(conn, memoryview(head)):
                return
            n = int.from_bytes(head, "little")
            if len(buffer) < n:
                buffer = bytearray(n)
            body = memoryview(buffer)[:n]
            if not _recv_exactly(conn, body):
                return
            time.sleep(delay_s)
            conn.sendall(head)
            conn.sendall(body)


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class RawEcho:
    """Client of :func:`_serve_raw`: sends a payload, receives it back into a reused buffer."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self._conn = socket.create_connection((host, int(port)))
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()

    def __call__(self, payload: bytes) -> None:
        n = len(payload)
        if len(self._buffer) < n:
            self._buffer = bytearray(n)
        self._conn.sendall(n.to_bytes(8, "little"))
        self._conn.sendall(payload)
        head = bytearray(8)
        if not (
            _recv_exactly(self._conn, memoryview(head))
            and _recv_exactly(self._conn, memoryview(self._buffer)[:n])
        ):
            raise ConnectionError("raw echo server closed the connection")

    def close(self) -> None:
        self._conn.close()


def _spawn(delay_ms: float, mode: str = "fixed") -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(delay_ms), "--serve-mode", mode],
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
    address: str,
    delay_s: float,
    sizes: Sequence[tuple[int, ...]],
    repeats: int,
    *,
    dtypes: Sequence[str] = tuple(DTYPES),
    scaled: bool = False,
    floor_address: str | None = None,
    raw_address: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (size, dtype): median ms in-process, over TCP, with shared memory (and
    through the bare gRPC echo at ``floor_address`` and the plain socket echo at
    ``raw_address``), and the ratios."""
    local = FixedCostExpert(delay_s, scaled=scaled)
    rows = []
    with (
        RemoteExpert.connect(address) as tcp,
        RemoteExpert.connect(address, shared_memory=True) as shm,
        contextlib.ExitStack() as stack,
    ):
        if not shm.uses_shared_memory:
            raise RuntimeError("shared memory was not negotiated")
        echo = None
        raw = None
        if raw_address is not None:
            raw = RawEcho(raw_address)
            stack.callback(raw.close)
        if floor_address is not None:
            channel = stack.enter_context(
                grpc.insecure_channel(floor_address, options=channel_options(1 << 30))
            )
            echo = channel.unary_unary(
                "/Floor/Echo", request_serializer=_identity, response_deserializer=_identity
            )
        for shape in sizes:
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
                sigma = torch.full((shape[0],), 0.5, dtype=dtype)
                calls = {"in_process": local, "tcp": tcp, "shm": shm}
                ms = {
                    name: _median_ms(e.velocity, (x, sigma), repeats) for name, e in calls.items()
                }
                payload = bytes(x.numel() * x.element_size())
                if echo is not None:
                    ms["floor"] = _median_ms(echo, (payload,), repeats)
                if raw is not None:
                    ms["raw"] = _median_ms(raw, (payload,), repeats)
                rows.append(
                    {
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "mib": x.numel() * x.element_size() / 2**20,
                        "ms": ms,
                        "tcp_ratio": ms["tcp"] / ms["in_process"],
                        "shm_ratio": ms["shm"] / ms["in_process"],
                        **({"floor_ratio": ms["floor"] / ms["in_process"]} if echo else {}),
                        **({"raw_ratio": ms["raw"] / ms["in_process"]} if raw else {}),
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


def _table(rows: list[dict[str, Any]], head: str) -> list[str]:
    floors = [name for name in ("floor", "raw") if name in rows[0]["ms"]]
    lines = [
        head,
        f"{'batch':<16}{'dtype':<6}{'MiB':>7}{'local ms':>10}{'tcp ms':>9}{'tcp x':>8}"
        f"{'shm ms':>9}{'shm x':>8}" + "".join(f"{n + ' ms':>10}{n + ' x':>9}" for n in floors),
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<16}{r['dtype']:<6}{r['mib']:>7.2f}"
            f"{ms['in_process']:>10.1f}{ms['tcp']:>9.1f}{r['tcp_ratio']:>8.3f}"
            f"{ms['shm']:>9.1f}{r['shm_ratio']:>8.3f}"
            + "".join(f"{ms[n]:>10.1f}{r[n + '_ratio']:>9.3f}" for n in floors)
        )
    return lines


def _report(
    rows: list[dict[str, Any]],
    scaled: list[dict[str, Any]],
    conc: dict[str, Any],
    delay_ms: float,
    scaled_ms: float,
) -> str:
    lines = _table(
        rows,
        f"remote / in-process time per velocity call (expert compute FIXED at {delay_ms:g} ms; "
        f"targets: tcp <= {TARGETS['tcp']}, shm <= {TARGETS['shm']}; floor: bare gRPC echo; "
        "raw: plain socket echo)",
    )
    if scaled:
        lines.append("")
        lines += _table(
            scaled,
            f"the same with compute SCALED to the batch: {scaled_ms:g} ms per 16x64x64 sample "
            "(8x16x128x128: 32 samples' worth)",
        )
    delays = "/".join(f"{d:g}" for d in conc["delays_ms"])
    lines += [
        "",
        f"3 concurrent experts ({delays} ms, batch {'x'.join(map(str, conc['shape']))} f32): "
        f"level {conc['three_ms']:.1f} ms vs slowest alone {conc['slowest_alone_ms']:.1f} ms, "
        f"ratio {conc['ratio']:.3f} (target <= {TARGETS['concurrency']})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="fixed expert compute")
    parser.add_argument(
        "--scaled-ms", type=float, default=50.0, help="scaled compute per 16x64x64 sample"
    )
    parser.add_argument("--no-scaled", action="store_true", help="skip the scaled table")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-mode", default="fixed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return _serve(args.serve, args.serve_mode)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # same on both sides; OpenMP on a busy 2-core box only adds noise
    tune_allocator()  # as the servers do (poegen serve)
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = QUICK_SIZES if args.quick else SIZES
    started = time.perf_counter()
    delays = sorted({args.delay_ms, *CONCURRENT_DELAYS_MS})
    servers = {(d, "fixed"): _spawn(d) for d in delays}
    servers[(args.delay_ms, "floor")] = _spawn(args.delay_ms, "floor")
    servers[(args.delay_ms, "raw")] = _spawn(args.delay_ms, "raw")
    if not args.no_scaled:
        servers[(args.scaled_ms, "scaled")] = _spawn(args.scaled_ms, "scaled")
    scaled: list[dict[str, Any]] = []
    try:
        rows = transport_rows(
            servers[(args.delay_ms, "fixed")][1], args.delay_ms / 1000, sizes, repeats,
            floor_address=servers[(args.delay_ms, "floor")][1],
            raw_address=servers[(args.delay_ms, "raw")][1],
        )  # fmt: skip
        conc = concurrency(
            [servers[(d, "fixed")][1] for d in CONCURRENT_DELAYS_MS],
            servers[(max(CONCURRENT_DELAYS_MS), "fixed")][1],
            (4, 16, 64, 64),
            repeats,
        )
        if not args.no_scaled:
            scaled = transport_rows(
                servers[(args.scaled_ms, "scaled")][1], args.scaled_ms / 1000, sizes,
                max(3, repeats // 2), dtypes=("f32",), scaled=True,
            )  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(10)
    print(_report(rows, scaled, conc, args.delay_ms, args.scaled_ms))
    worst = {k: max(r[f"{k}_ratio"] for r in rows) for k in ("tcp", "shm")}
    print(
        f"worst (fixed compute): tcp {worst['tcp']:.3f}, shm {worst['shm']:.3f}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    report = {
        "delay_ms": args.delay_ms,
        "scaled_ms_per_sample": None if args.no_scaled else args.scaled_ms,
        "repeats": repeats,
        "targets": TARGETS,
        "rows": rows,
        "scaled_rows": scaled,
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
