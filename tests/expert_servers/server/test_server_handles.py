"""Condition handles: conditioned views, Release, LRU and TTL eviction, retirement on swap."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from helpers.server import rpc_error, run, running
from helpers.server_experts import Gaussian

from poegen.expert_servers.server import ServerConfig
from poegen.expert_servers.server.handles import HandleTable
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError
from poegen.kernel.refusal import Code
from poegen.v1 import expert_pb2 as pb

X = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
SIGMA = torch.tensor([0.4, 0.7])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_table_evicts_least_recently_used() -> None:
    table = HandleTable(2, 100.0)
    table.retire("r1")
    a, b = table.add("r1", "A"), table.add("r1", "B")
    assert table.get(a, "r1") == "A"  # a is now the most recent
    c = table.add("r1", "C")
    assert len(table) == 2
    with pytest.raises(ExpertError) as e:
        table.get(b, "r1")
    assert e.value.code == Code.NOT_FOUND and e.value.field == "handle"
    assert (table.get(a, "r1"), table.get(c, "r1")) == ("A", "C")


def test_table_forgets_after_ttl_since_last_use() -> None:
    clock = Clock()
    table = HandleTable(10, 5.0, clock=clock)
    table.retire("r1")
    a, b = table.add("r1", "A"), table.add("r1", "B")
    clock.now = 4.0
    table.get(a, "r1")
    clock.now = 6.0
    assert table.get(a, "r1") == "A"
    with pytest.raises(ExpertError) as e:
        table.get(b, "r1")
    assert e.value.code == Code.NOT_FOUND


def test_table_retires_views_of_old_revisions() -> None:
    table = HandleTable(10, 100.0)
    table.retire("r1")
    view = object()
    a = table.add("r1", view)
    table.retire("r2")
    late = table.add("r1", object())  # a Prepare on r1 that finished after the swap
    for handle in (a, late):
        with pytest.raises(ExpertError) as e:
            table.get(handle, "r2")
        assert e.value.code == Code.FAILED_PRECONDITION
    assert all(entry.target is None for entry in table._entries.values())  # views dropped
    assert table.release(a) and not table.release(a)


def _request(handle: str) -> pb.VelocityRequest:
    return pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA), handle=handle)


def test_prepared_view_answers_for_its_condition_until_released() -> None:
    async def body() -> None:
        async with running(expert=Gaussian([0.0, 0.0])) as server:
            prepared = await server.stub.Prepare(
                pb.PrepareRequest(condition=pb.Condition(scalars={"shift": 1.5}))
            )
            assert prepared.handle and prepared.revision
            reply = await server.stub.Velocity(_request(prepared.handle))
            torch.testing.assert_close(
                codec.decode(reply.velocity, field="v"), Gaussian([1.5, 1.5]).velocity(X, SIGMA)
            )
            default = await server.stub.Velocity(_request(""))
            torch.testing.assert_close(
                codec.decode(default.velocity, field="v"), Gaussian([0.0, 0.0]).velocity(X, SIGMA)
            )
            assert (await server.stub.Release(pb.ReleaseRequest(handle=prepared.handle))).released
            assert not (
                await server.stub.Release(pb.ReleaseRequest(handle=prepared.handle))
            ).released
            code, err = await rpc_error(server.stub.Velocity(_request(prepared.handle)))
            assert code == grpc.StatusCode.NOT_FOUND and err is not None and err.field == "handle"

    run(body())


def test_server_bounds_its_handles_by_count_and_ttl() -> None:
    async def body() -> None:
        config = ServerConfig(max_handles=2, handle_ttl_s=0.5)
        async with running(config, expert=Gaussian()) as server:
            handles = [(await server.stub.Prepare(pb.PrepareRequest())).handle for _ in range(3)]
            code, _ = await rpc_error(server.stub.Velocity(_request(handles[0])))
            assert code == grpc.StatusCode.NOT_FOUND  # evicted: least recently used
            await server.stub.Velocity(_request(handles[2]))
            await asyncio.sleep(0.6)
            code, _ = await rpc_error(server.stub.Velocity(_request(handles[2])))
            assert code == grpc.StatusCode.NOT_FOUND  # expired
            assert server.host.handles.__len__() == 0

    run(body())
