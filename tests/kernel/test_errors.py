"""ExpertError → gRPC status → client, through a real grpc.aio server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2

from poegen.kernel import codec
from poegen.kernel.errors import ExpertError, abort, from_rpc_error, maps_errors, to_status
from poegen.kernel.refusal import Code, validate_finite, validate_sigma
from poegen.v1 import expert_pb2, expert_pb2_grpc


def test_constructors_and_message():
    cases = [
        (ExpertError.invalid, Code.INVALID_ARGUMENT),
        (ExpertError.not_found, Code.NOT_FOUND),
        (ExpertError.unavailable, Code.UNAVAILABLE),
        (ExpertError.failed_precondition, Code.FAILED_PRECONDITION),
        (ExpertError.resource_exhausted, Code.RESOURCE_EXHAUSTED),
        (ExpertError.unauthenticated, Code.UNAUTHENTICATED),
        (ExpertError.permission_denied, Code.PERMISSION_DENIED),
    ]
    for make, code in cases:
        err = make("x.shape", "bad")
        assert (err.code, err.field, err.reason, str(err)) == (
            code,
            "x.shape",
            "bad",
            "x.shape: bad",
        )
    assert ExpertError.unauthenticated().field == "authorization"
    assert ExpertError.permission_denied().code is Code.PERMISSION_DENIED
    assert str(ExpertError(Code.INTERNAL, "", "oops")) == "oops"
    with pytest.raises(ValueError):
        ExpertError(Code.OK, "x", "fine")


def test_to_status_carries_a_bad_request():
    status = to_status(ExpertError.not_found("handle", "unknown handle"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "handle: unknown handle"
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    bad = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("handle", "unknown handle")
    ]


def test_maps_errors_needs_an_async_method():
    with pytest.raises(TypeError):

        @maps_errors
        def Describe(self, request, context):  # pragma: no cover
            return None


class _Servicer(expert_pb2_grpc.ExpertServiceServicer):
    """Each RPC exercises one path of maps_errors."""

    @maps_errors
    async def Velocity(self, request, context):
        # the real edge: decode, validate, answer
        x = validate_finite(codec.decode(request.x, field="x", max_bytes=1 << 10), "x")
        validate_sigma(codec.decode(request.sigma, field="sigma"), x.shape[0])
        return expert_pb2.VelocityResponse(velocity=codec.encode(-x), revision="r1")

    @maps_errors
    async def Release(self, request, context):
        raise ExpertError.not_found("handle", "unknown handle")

    @maps_errors
    async def Describe(self, request, context):
        raise RuntimeError("secret detail /srv/models/private")

    @maps_errors
    async def LogProb(self, request, context):
        await abort(context, ExpertError.unavailable("", "no model is ready yet"))

    @maps_errors
    async def Propose(self, request, context):
        await context.abort(grpc.StatusCode.ABORTED, "aborted by the method itself")

    @maps_errors
    async def LoadModel(self, request, context) -> AsyncIterator[expert_pb2.LoadModelResponse]:
        yield expert_pb2.LoadModelResponse(stage=expert_pb2.LOAD_STAGE_QUEUED)
        if request.model_id == "boom":
            raise KeyError("secret detail")
        raise ExpertError.permission_denied()


def _serve(test: Callable[[expert_pb2_grpc.ExpertServiceStub], Awaitable[None]]) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        expert_pb2_grpc.add_ExpertServiceServicer_to_server(_Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await test(expert_pb2_grpc.ExpertServiceStub(channel))
        finally:
            await server.stop(None)

    asyncio.run(main())


async def _error_of(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _velocity(x: torch.Tensor, sigma: torch.Tensor) -> expert_pb2.VelocityRequest:
    return expert_pb2.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma))


def test_codec_errors_reach_the_client_with_code_field_and_description():
    async def test(stub: expert_pb2_grpc.ExpertServiceStub) -> None:
        reply = await stub.Velocity(_velocity(torch.ones(2, 3), torch.tensor([0.5, 1.0])))
        assert torch.equal(codec.decode(reply.velocity, field="velocity"), -torch.ones(2, 3))

        cases = [
            (_velocity(torch.ones(2, 3), torch.tensor([0.5, 0.0])), "INVALID_ARGUMENT", "sigma"),
            (_velocity(torch.ones(2, 3), torch.tensor([0.5])), "INVALID_ARGUMENT", "sigma.shape"),
            (_velocity(torch.ones(400), torch.ones(400)), "RESOURCE_EXHAUSTED", "x.shape"),
            (expert_pb2.VelocityRequest(), "INVALID_ARGUMENT", "x.dtype"),
        ]
        nan = _velocity(torch.tensor([[float("nan")]]), torch.tensor([0.5]))
        cases.append((nan, "INVALID_ARGUMENT", "x"))
        short = _velocity(torch.ones(2, 3), torch.tensor([0.5, 1.0]))
        short.x.data = short.x.data[:-1]
        cases.append((short, "INVALID_ARGUMENT", "x.data"))
        for request, code, field in cases:
            e = await _error_of(stub.Velocity(request))
            err = from_rpc_error(e)
            assert e.code() is grpc.StatusCode[code] and err is not None, e
            assert (err.code, err.field) == (Code[code], field)
            assert e.details() == f"{field}: {err.reason}" and err.reason

    _serve(test)


def test_raised_and_explicit_aborts():
    async def test(stub: expert_pb2_grpc.ExpertServiceStub) -> None:
        err = from_rpc_error(await _error_of(stub.Release(expert_pb2.ReleaseRequest(handle="h"))))
        assert err is not None
        assert (err.code, err.field, err.reason) == (
            Code.NOT_FOUND,
            "handle",
            "unknown handle",
        )

        err = from_rpc_error(await _error_of(stub.LogProb(expert_pb2.LogProbRequest())))
        assert err is not None and (err.code, err.field) == (Code.UNAVAILABLE, "")

        e = await _error_of(stub.Propose(expert_pb2.ProposeRequest()))
        assert e.code() is grpc.StatusCode.ABORTED and from_rpc_error(e) is None

    _serve(test)


def test_bugs_become_internal_without_details(caplog):
    async def test(stub: expert_pb2_grpc.ExpertServiceStub) -> None:
        e = await _error_of(stub.Describe(expert_pb2.DescribeRequest()))
        assert e.code() is grpc.StatusCode.INTERNAL
        assert "secret" not in e.details() and "Traceback" not in e.details()
        assert "incident" in e.details()
        assert from_rpc_error(e) is None

    with caplog.at_level(logging.ERROR, logger="poegen.kernel.errors"):
        _serve(test)
    [record] = [r for r in caplog.records if r.name == "poegen.kernel.errors"]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


def test_server_streams_map_errors_after_replies():
    async def test(stub: expert_pb2_grpc.ExpertServiceStub) -> None:
        for model_id, code in [("m", "PERMISSION_DENIED"), ("boom", "INTERNAL")]:
            call = stub.LoadModel(expert_pb2.LoadModelRequest(model_id=model_id))
            first = await call.read()
            assert first.stage == expert_pb2.LOAD_STAGE_QUEUED
            e = await _error_of(call.read())
            assert e.code() is grpc.StatusCode[code]
            err = from_rpc_error(e)
            if code == "INTERNAL":
                assert err is None and "secret" not in e.details()
            else:
                assert err is not None and err.field == "authorization"

    _serve(test)


def test_every_refusal_code_is_the_grpc_status_of_the_same_number_and_name():
    from poegen.kernel.errors import code_of, grpc_code

    assert {c.name for c in Code} == {s.name for s in grpc.StatusCode}
    for code in Code:
        status = grpc_code(code)
        assert (status.name, status.value[0]) == (code.name, code.value)
        assert code_of(status) is code
    with pytest.raises(TypeError, match=r"refusal\.Code"):
        ExpertError(grpc.StatusCode.NOT_FOUND, "handle", "a gRPC code is refused")  # type: ignore[arg-type]
