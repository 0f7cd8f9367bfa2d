"""Helpers of the remote-expert and sampler-service tests.

The kernel's client side is synchronous (experts are called from worker threads), so the
servers run on an asyncio loop in a background thread (:class:`LoopThread`) and the test body
stays plain sync code. Every server binds 127.0.0.1, port 0 unless a test needs a fixed port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from torch import Tensor

from poegen.expert_servers.server import ExpertHost, ServerConfig, create_server
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind
from poegen.kernel.service import SamplerHost, SamplerServerConfig, create_sampler_server

_T = TypeVar("_T")


class LoopThread:
    """An event loop running in a daemon thread; servers started on it stop at :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._hosts: list[ExpertHost | SamplerHost] = []

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = scaled(30.0)) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, expert: Any, config: ServerConfig | None = None, **kw: Any) -> Served:
        """Start an expert host for ``expert`` (port 0 unless ``config`` says otherwise)."""

        async def start() -> tuple[ExpertHost, int]:
            host, port = create_server(config or ServerConfig(), expert=expert, **kw)
            await host.start()
            return host, port

        host, port = self.run(start())
        self._hosts.append(host)
        return Served(host, port, self)

    def sampler(self, config: SamplerServerConfig | None = None) -> Served:
        async def start() -> tuple[SamplerHost, int]:
            host, port = create_sampler_server(config or SamplerServerConfig())
            await host.start()
            return host, port

        host, port = self.run(start())
        self._hosts.append(host)
        return Served(host, port, self)

    def stop(self, host: ExpertHost | SamplerHost) -> None:
        if host in self._hosts:
            self._hosts.remove(host)
            self.run(host.stop(0))

    def close(self) -> None:
        for host in list(self._hosts):
            self.stop(host)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(scaled(10))
        self.loop.close()


@dataclass
class Served:
    host: Any
    port: int
    loop: LoopThread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.stop(self.host)


def free_port() -> int:
    """A port nothing listens on right now (for servers started after their clients)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = scaled(5.0)) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (default scaled; a caller's
    own ``timeout`` is written ``scaled(...)`` at the call)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclass
class Counter:
    """Calls made to a family of expert views, thread-safe."""

    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bump(self) -> None:
        with self.lock:
            self.calls += 1


class CountingGaussian(Gaussian):
    """``Gaussian`` whose velocity calls (its conditioned views' too) are counted."""

    def __init__(self, *args: Any, counter: Counter | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.counter = counter or Counter()

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.counter.bump()
        return super().velocity(x, sigma)

    def prepare(self, condition: Any) -> CountingGaussian:
        view = super().prepare(condition)
        return CountingGaussian(
            view.mean.tolist(),
            view.std,
            delay_s=view.delay_s,
            max_batch=view.max_batch,
            name=view.name,
            counter=self.counter,
        )


class Jitter:
    """A constraint that proposes: x + 0.05·ε with ε from a generator seeded by ``seed``."""

    def __init__(self, shape: tuple[int, ...] = (2,)) -> None:
        self.shape = shape

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name="jitter",
            kind=ExpertKind.CONSTRAINT,
            capabilities=frozenset({Capability.PROPOSE}),
            sample_shape=self.shape,
        )

    def log_potential(self, x0: Tensor) -> Tensor:
        return torch.zeros(x0.shape[0], dtype=torch.float32)

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return x + 0.05 * torch.randn(x.shape, generator=g, dtype=x.dtype)


def stream_failure(call: Any) -> tuple[Any, str | None]:
    """(status code, field) a gRPC stream (or call) ended with; fails if it succeeded."""
    import grpc

    from poegen.kernel.errors import from_rpc_error

    try:
        list(call)
    except grpc.RpcError as e:
        err = from_rpc_error(e)
        return e.code(), None if err is None else err.field
    raise AssertionError("the call succeeded")
