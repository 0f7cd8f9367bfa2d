"""Helpers of the server tests: real hosts on 127.0.0.1, port 0, and small request builders."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from helpers.timing import scaled

from poegen.expert_servers.server import ExpertHost, ServerConfig, create_server
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError, from_rpc_error
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc, tensor_pb2

_T = TypeVar("_T")
REPO = Path(__file__).resolve().parents[2]
OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def run(coro: Coroutine[Any, Any, _T], timeout: float = scaled(30.0)) -> _T:
    """Run a test body in a fresh event loop, with a timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Running:
    host: ExpertHost
    port: int
    channel: grpc.aio.Channel
    stub: expert_pb2_grpc.ExpertServiceStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def running(config: ServerConfig | None = None, **kwargs: Any) -> AsyncIterator[Running]:
    """A started host with an insecure channel to it; stopped (no grace) on exit."""
    host, port = create_server(config or ServerConfig(), **kwargs)
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    try:
        yield Running(host, port, channel, expert_pb2_grpc.ExpertServiceStub(channel))
    finally:
        await channel.close()
        await host.stop(0)


def tensor(values: Any, dtype: torch.dtype = torch.float32) -> tensor_pb2.Tensor:
    return codec.encode(torch.as_tensor(values, dtype=dtype))


def velocity_request(
    batch: int = 3, dim: int = 2, sigma: float = 0.5, **kw: Any
) -> pb.VelocityRequest:
    x = torch.linspace(-1, 1, batch * dim).reshape(batch, dim)
    return pb.VelocityRequest(x=codec.encode(x), sigma=tensor([sigma] * batch), **kw)


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, ExpertError | None]:
    """The status code and the ExpertError of a call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), from_rpc_error(e)
    raise AssertionError("the call succeeded")


async def collect(stream: Any) -> list[Any]:
    return [reply async for reply in stream]


# ------------------------------------------------------------------ subprocess servers


@dataclass
class Process:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = scaled(20.0)) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_process(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = scaled(30.0)
) -> Process:
    """Start ``python ARGS`` and wait for its ``poegen: serving ... on HOST:PORT`` line."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        match = re.match(r"poegen: serving \S+ on 127\.0\.0\.1:(\d+)$", lines[-1])
        if match:
            return Process(proc, int(match.group(1)), lines)
    proc.kill()
    proc.wait()
    raise AssertionError(f"server did not start; stdout: {lines}")
