"""Health on shutdown, shared-memory opt-in, and per-host metrics registries."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.server import rpc_error, run, running
from helpers.server_experts import Gaussian, HalfSpace
from helpers.timing import scaled

from poegen.expert_servers.server import ServerConfig, create_server
from poegen.kernel import codec
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc

X = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
SIGMA = torch.tensor([0.4, 0.7])
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_turns_not_serving_when_shutdown_begins_and_in_flight_calls_finish() -> None:
    async def body() -> None:
        async with running(expert=Gaussian(delay_s=0.5)) as server:
            watch = health_pb2_grpc.HealthStub(server.channel).Watch(
                health_pb2.HealthCheckRequest(service="poegen.v1.ExpertService")
            )
            assert (await watch.read()).status == SERVING
            call = asyncio.ensure_future(
                server.stub.Velocity(
                    pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA))
                )
            )
            await asyncio.sleep(0.1)
            stopping = asyncio.create_task(server.host.stop(5.0))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()  # an open Watch would hold the drain for the whole grace period
            reply = await call  # finishes within the grace period
            assert reply.revision
            await stopping

    run(body())


def test_shared_memory_tensors_are_accepted_only_after_opt_in() -> None:
    async def body() -> None:
        for enabled in (False, True):
            async with running(ServerConfig(shared_memory=enabled), expert=Gaussian()) as server:
                assert (await server.stub.Describe(pb.DescribeRequest())).shared_memory is enabled
                with codec.SharedMemoryPool(min_tensor_bytes=1) as pool:
                    request = pb.VelocityRequest(
                        x=codec.encode(X, shared_memory=pool), sigma=codec.encode(SIGMA)
                    )
                    assert request.x.WhichOneof("storage") == "shared_memory"
                    if not enabled:
                        code, err = await rpc_error(server.stub.Velocity(request))
                        assert code == grpc.StatusCode.INVALID_ARGUMENT
                        assert err is not None and err.field == "x.shared_memory"
                        continue
                    reply = await server.stub.Velocity(request)
                torch.testing.assert_close(
                    codec.decode(reply.velocity, field="v"), Gaussian().velocity(X, SIGMA)
                )

    run(body())


def test_replies_go_to_the_room_the_client_offers() -> None:
    """With shared memory on, Velocity and Propose write their reply into the client's room;
    a room of the wrong size is refused before the model runs."""

    async def body() -> None:
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
        sigma = torch.full((64,), 0.5)
        nbytes = x.numel() * 4
        async with running(ServerConfig(shared_memory=True), expert=Gaussian()) as server:
            with codec.SharedMemoryPool(min_tensor_bytes=1) as pool:
                room = pool.reserve(nbytes)
                request = pb.VelocityRequest(
                    x=codec.encode(x), sigma=codec.encode(sigma), reply_shared_memory=room
                )
                reply = await server.stub.Velocity(request)
                assert reply.velocity.WhichOneof("storage") == "shared_memory"
                assert reply.velocity.shared_memory == room
                v = codec.decode(reply.velocity, field="v", shared_memory=pool)
                assert torch.equal(v, Gaussian().velocity(x, sigma))
                request.reply_shared_memory.nbytes = nbytes - 4
                code, err = await rpc_error(server.stub.Velocity(request))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert err is not None and err.field == "reply_shared_memory.nbytes"
                assert room.name not in err.reason
        async with running(ServerConfig(shared_memory=True), expert=HalfSpace()) as server:
            with codec.SharedMemoryPool(min_tensor_bytes=1) as pool:
                room = pool.reserve(nbytes)
                reply = await server.stub.Propose(
                    pb.ProposeRequest(
                        x=codec.encode(x), sigma=codec.encode(sigma),
                        mode=pb.PROPOSE_MODE_PROJECT, reply_shared_memory=room,
                    )
                )  # fmt: skip
                assert reply.x.shared_memory == room
                projected = codec.decode(reply.x, field="x", shared_memory=pool)
                assert torch.equal(projected, HalfSpace().project(x, sigma))

    run(body())


def _scrape(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=scaled(10)) as reply:
        return reply.read().decode()


def test_each_host_has_its_own_metrics_registry() -> None:
    async def body() -> tuple[str, str]:
        hosts = [
            create_server(ServerConfig(metrics_port=0), expert=Gaussian())[0] for _ in range(2)
        ]
        for host in hosts:
            await host.start()
        try:
            async with running(ServerConfig(), expert=Gaussian()):
                pass  # a third host without an endpoint
            async with grpc.aio.insecure_channel(f"127.0.0.1:{hosts[0].port}") as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                for _ in range(3):
                    await stub.Velocity(
                        pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA))
                    )
            assert hosts[0].metrics_port and hosts[1].metrics_port
            return _scrape(hosts[0].metrics_port), _scrape(hosts[1].metrics_port)
        finally:
            for host in hosts:
                await host.stop(0)

    first, second = run(body())
    velocity = 'poegen_rpc_latency_seconds_count{method="/poegen.v1.ExpertService/Velocity"}'
    assert f"{velocity} 3.0" in first and velocity not in second
    assert 'poegen_batch_size_sum{method="Velocity"} 6.0' in first
    assert "poegen_model_serving 1.0" in first and "poegen_model_serving 1.0" in second
