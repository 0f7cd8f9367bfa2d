"""An expert host caps the calls and the request bytes it holds at once (issue 16, item 5):
beyond either, RESOURCE_EXHAUSTED on ``request`` before the request is parsed; the calls in
flight finish, and once they have, the host takes calls again."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from helpers.server import rpc_error, run, running, velocity_request
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from torch import Tensor

from poegen.expert_servers.server import ServerConfig
from poegen.kernel import codec
from poegen.v1 import expert_pb2 as pb


class Gated(Gaussian):
    """A fault injected on purpose: each velocity call waits until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__(max_batch=None)
        self.gate = threading.Event()

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert self.gate.wait(scaled(60)), "the test never opened the gate"
        return super().velocity(x, sigma)


async def _until(predicate, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _big_request(nbytes: int) -> pb.VelocityRequest:
    batch = nbytes // (3 * 4)  # x (batch, 2) and sigma (batch,) in float32
    x = torch.zeros(batch, 2)
    return pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(torch.full((batch,), 0.5)))


def test_calls_beyond_the_cap_are_refused_and_the_host_serves_on():
    expert = Gated()

    async def body() -> None:
        async with running(ServerConfig(max_inflight_calls=2), expert=expert) as r:
            held = [asyncio.ensure_future(r.stub.Velocity(velocity_request())) for _ in range(2)]
            await _until(lambda: r.host.inflight.calls == 2, scaled(30))
            code, err = await rpc_error(r.stub.Velocity(velocity_request()))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err is not None and err.field == "request" and "calls in flight" in err.reason
            expert.gate.set()
            replies = await asyncio.gather(*held)
            assert all(list(reply.velocity.shape) == [3, 2] for reply in replies)
            await _until(lambda: r.host.inflight.calls == 0, scaled(30))
            assert list((await r.stub.Velocity(velocity_request())).velocity.shape) == [3, 2]

    run(body(), timeout=scaled(60))


def test_request_bytes_beyond_the_cap_are_refused_and_small_calls_pass():
    expert = Gated()
    config = ServerConfig(max_message_bytes=1 << 20, max_inflight_bytes=(6 << 20) // 5)

    async def body() -> None:
        async with running(config, expert=expert) as r:
            held = asyncio.ensure_future(r.stub.Velocity(_big_request(700 << 10)))
            await _until(lambda: r.host.inflight.calls == 1, scaled(30))
            assert r.host.inflight.bytes > 700 << 10
            code, err = await rpc_error(r.stub.Velocity(_big_request(700 << 10)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err is not None and err.field == "request" and "bytes" in err.reason
            small = asyncio.ensure_future(r.stub.Velocity(velocity_request()))  # fits beside
            await _until(lambda: r.host.inflight.calls == 2, scaled(30))
            expert.gate.set()
            await asyncio.gather(held, small)
            await _until(lambda: r.host.inflight.bytes == 0, scaled(30))
            assert (await r.stub.Velocity(_big_request(700 << 10))).velocity.shape[0] > 0

    run(body(), timeout=scaled(60))


def test_the_byte_cap_holds_at_least_one_largest_message():
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        ServerConfig(max_message_bytes=1 << 20, max_inflight_bytes=1 << 19)
    assert ServerConfig(max_message_bytes=1 << 20).max_inflight_bytes == 2 << 20
