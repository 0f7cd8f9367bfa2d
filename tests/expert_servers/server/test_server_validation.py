"""The expert host validates every request at the edge and keeps serving afterwards.

Each bad request must fail with its status code and a BadRequest field violation naming the
offending field (read back with ``from_rpc_error``), and the same server must then answer a
good call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
from helpers.server import (
    collect,
    rpc_error,
    run,
    running,
    tensor,
    velocity_request,
)
from helpers.server_experts import Gaussian, HalfSpace, LinearReward

from poegen.expert_servers.server import ServerConfig
from poegen.kernel import codec
from poegen.kernel.errors import code_of
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import tensor_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
F32 = tensor_pb2.DTYPE_F32

EXPERTS: dict[str, Callable[[], Any]] = {
    "generative": lambda: Gaussian([0.5, -0.5], 0.8, max_batch=4),
    "discriminative": lambda: LinearReward([1.0, 2.0]),
    "constraint": HalfSpace,
}
X = [[0.1, 0.2], [0.3, -0.4], [1.0, 2.0]]
SIGMA = [0.5, 0.5, 0.5]


def _vel(x: Any = None, sigma: Any = None, **kw: Any) -> pb.VelocityRequest:
    req = pb.VelocityRequest(**kw)
    if x is not None:
        req.x.CopyFrom(x if isinstance(x, tensor_pb2.Tensor) else tensor(x))
    if sigma is not None:
        req.sigma.CopyFrom(sigma if isinstance(sigma, tensor_pb2.Tensor) else tensor(sigma))
    return req


# (id, expert, rpc, request, code, field)
CASES: list[tuple[str, str, str, Any, grpc.StatusCode, str]] = [
    ("x missing", "generative", "Velocity", _vel(sigma=SIGMA), INVALID, "x"),
    (
        "x dtype unspecified",
        "generative",
        "Velocity",
        _vel(tensor_pb2.Tensor(shape=[3, 2], data=bytes(24)), SIGMA),
        INVALID,
        "x.dtype",
    ),
    (
        "x bytes do not match shape",
        "generative",
        "Velocity",
        _vel(tensor_pb2.Tensor(dtype=F32, shape=[3, 2], data=bytes(8)), SIGMA),
        INVALID,
        "x.data",
    ),
    (
        "x negative dimension",
        "generative",
        "Velocity",
        _vel(tensor_pb2.Tensor(dtype=F32, shape=[-3, 2], data=b""), SIGMA),
        INVALID,
        "x.shape",
    ),
    (
        "x shape overflows",
        "generative",
        "Velocity",
        _vel(tensor_pb2.Tensor(dtype=F32, shape=[2**40, 2**40], data=b""), SIGMA),
        EXHAUSTED,
        "x.shape",
    ),
    (
        "x over the size limit",
        "generative",
        "Velocity",
        _vel(tensor_pb2.Tensor(dtype=F32, shape=[1 << 20, 2], data=b""), SIGMA),
        EXHAUSTED,
        "x.shape",
    ),
    (
        "x integer dtype",
        "generative",
        "Velocity",
        _vel(tensor(X, torch.int64), SIGMA),
        INVALID,
        "x.dtype",
    ),
    (
        "x wrong sample shape",
        "generative",
        "Velocity",
        _vel([[0.0, 0.0, 0.0]] * 3, SIGMA),
        INVALID,
        "x.shape",
    ),
    ("x without batch dimension", "generative", "Velocity", _vel(0.5, [0.5]), INVALID, "x.shape"),
    ("x empty batch", "generative", "Velocity", _vel(torch.zeros(0, 2), []), INVALID, "x.shape"),
    ("x NaN", "generative", "Velocity", _vel([[math.nan, 0.0], *X[1:]], SIGMA), INVALID, "x"),
    ("x inf", "generative", "Velocity", _vel([[math.inf, 0.0], *X[1:]], SIGMA), INVALID, "x"),
    (
        "batch over max_batch",
        "generative",
        "Velocity",
        _vel([[0.0, 0.0]] * 5, [0.5] * 5),
        EXHAUSTED,
        "x.shape",
    ),
    (
        "x in shared memory not enabled",
        "generative",
        "Velocity",
        _vel(
            tensor_pb2.Tensor(
                dtype=F32,
                shape=[3, 2],
                shared_memory=tensor_pb2.SharedMemoryRef(
                    name="poegen_0123456789abcdef", offset=0, nbytes=24
                ),
            ),
            SIGMA,
        ),
        INVALID,
        "x.shared_memory",
    ),
    ("sigma missing", "generative", "Velocity", _vel(X), INVALID, "sigma"),
    ("sigma zero", "generative", "Velocity", _vel(X, [0.5, 0.0, 0.5]), INVALID, "sigma"),
    ("sigma above one", "generative", "Velocity", _vel(X, [0.5, 1.5, 0.5]), INVALID, "sigma"),
    ("sigma NaN", "generative", "Velocity", _vel(X, [0.5, math.nan, 0.5]), INVALID, "sigma"),
    ("sigma wrong length", "generative", "Velocity", _vel(X, [0.5, 0.5]), INVALID, "sigma.shape"),
    (
        "sigma integer dtype",
        "generative",
        "Velocity",
        _vel(X, tensor([1, 1, 1], torch.int64)),
        INVALID,
        "sigma.dtype",
    ),
    (
        "unknown handle",
        "generative",
        "Velocity",
        _vel(X, SIGMA, handle="nope"),
        grpc.StatusCode.NOT_FOUND,
        "handle",
    ),
    (
        "log_prob of generative without sigma",
        "generative",
        "LogProb",
        pb.LogProbRequest(x=tensor(X)),
        INVALID,
        "sigma",
    ),
    (
        "propose mode unspecified",
        "generative",
        "Propose",
        pb.ProposeRequest(x=tensor(X), sigma=tensor(SIGMA)),
        INVALID,
        "mode",
    ),
    (
        "propose without capability",
        "generative",
        "Propose",
        pb.ProposeRequest(x=tensor(X), sigma=tensor(SIGMA), mode=pb.PROPOSE_MODE_PROPOSE),
        PRECONDITION,
        "mode",
    ),
    (
        "encode without autoencoder",
        "generative",
        "Encode",
        pb.EncodeRequest(pixels=tensor(torch.zeros(1, 3, 4, 4))),
        PRECONDITION,
        "pixels",
    ),
    (
        "decode without autoencoder",
        "generative",
        "Decode",
        pb.DecodeRequest(latents=tensor(torch.zeros(1, 4, 2, 2))),
        PRECONDITION,
        "latents",
    ),
    (
        "condition the expert refuses",
        "generative",
        "Prepare",
        pb.PrepareRequest(condition=pb.Condition(scalars={"scale": 2.0})),
        INVALID,
        "condition",
    ),
    (
        "condition scalar NaN",
        "generative",
        "Prepare",
        pb.PrepareRequest(condition=pb.Condition(scalars={"shift": math.nan})),
        INVALID,
        "condition.scalars[shift]",
    ),
    ("release without handle", "generative", "Release", pb.ReleaseRequest(), INVALID, "handle"),
    (
        "load model with LoadModel off",
        "generative",
        "LoadModel",
        pb.LoadModelRequest(model_id="a.yaml"),
        grpc.StatusCode.PERMISSION_DENIED,
        "x-poegen-admin-token",
    ),
    (
        "sigma given to a reward",
        "discriminative",
        "LogProb",
        pb.LogProbRequest(x=tensor(X), sigma=tensor(SIGMA)),
        INVALID,
        "sigma",
    ),
    ("velocity of a reward", "discriminative", "Velocity", _vel(X, SIGMA), PRECONDITION, "x"),
    (
        "reply room without shared memory",
        "generative",
        "Velocity",
        _vel(X, SIGMA, reply_shared_memory=tensor_pb2.SharedMemoryRef(name="poegen_" + "0" * 16)),
        INVALID,
        "reply_shared_memory",
    ),
    (
        "propose mode the constraint lacks",
        "constraint",
        "Propose",
        pb.ProposeRequest(x=tensor(X), sigma=tensor(SIGMA), mode=pb.PROPOSE_MODE_PROPOSE),
        PRECONDITION,
        "mode",
    ),
    (
        "condition for an unconditional expert",
        "constraint",
        "Prepare",
        pb.PrepareRequest(condition=pb.Condition(text="a cat")),
        INVALID,
        "condition",
    ),
]


async def _good_call(stub: Any, kind: str) -> None:
    if kind == "generative":
        reply = await stub.Velocity(_vel(X, SIGMA))
        assert list(reply.velocity.shape) == [3, 2]
    elif kind == "discriminative":
        reply = await stub.LogProb(pb.LogProbRequest(x=tensor(X)))
        assert codec.decode(reply.log_prob, field="log_prob").tolist() == pytest.approx(
            [0.5, -0.5, 5.0]
        )
    else:
        reply = await stub.Propose(
            pb.ProposeRequest(x=tensor(X), sigma=tensor(SIGMA), mode=pb.PROPOSE_MODE_PROJECT)
        )
        assert codec.decode(reply.x, field="x").min() >= 0
    assert reply.revision


@pytest.mark.parametrize(
    ("kind", "method", "request_", "code", "field"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_request_names_field_and_server_keeps_serving(kind, method, request_, code, field):
    async def body() -> None:
        config = ServerConfig(max_message_bytes=1 << 20)
        async with running(config, expert=EXPERTS[kind]()) as server:
            call = getattr(server.stub, method)(request_)
            got_code, err = await rpc_error(collect(call) if method == "LoadModel" else call)
            assert got_code == code
            assert err is not None and err.code is code_of(code)
            assert err.field == field, err
            await _good_call(server.stub, kind)

    run(body())


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_message_over_grpc_limit_is_resource_exhausted():
    async def body() -> None:
        async with running(ServerConfig(max_message_bytes=1 << 20), expert=Gaussian()) as server:
            big = torch.zeros(300_000, 2)  # 2.4 MB > 1 MiB
            code, _ = await rpc_error(
                server.stub.Velocity(
                    pb.VelocityRequest(x=codec.encode(big), sigma=tensor([0.5] * 300_000))
                )
            )
            assert code == EXHAUSTED
            await _good_call(server.stub, "generative")

    run(body())


def test_velocity_log_prob_and_describe_match_the_expert():
    expert = Gaussian([0.5, -0.5], 0.8, max_batch=4)
    x = torch.tensor(X)
    sigma = torch.tensor([0.2, 0.5, 0.9])

    async def body() -> None:
        async with running(expert=expert) as server:
            info = await server.stub.Describe(pb.DescribeRequest())
            assert info.kind == pb.EXPERT_KIND_GENERATIVE
            assert list(info.capabilities) == [pb.CAPABILITY_LOG_PROB]
            assert list(info.sample_shape) == [2] and info.max_batch == 4
            assert info.model_id == "analytic" and info.revision
            v = await server.stub.Velocity(
                pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma))
            )
            assert v.revision == info.revision
            got = codec.decode(v.velocity, field="velocity")
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expert.velocity(x, sigma))
            lp = await server.stub.LogProb(
                pb.LogProbRequest(x=codec.encode(x), sigma=codec.encode(sigma))
            )
            torch.testing.assert_close(
                codec.decode(lp.log_prob, field="lp"), expert.log_prob(x, sigma).float()
            )
            half = codec.encode(x.to(torch.bfloat16))
            v16 = await server.stub.Velocity(pb.VelocityRequest(x=half, sigma=codec.encode(sigma)))
            assert codec.decode(v16.velocity, field="v").dtype == torch.bfloat16

    run(body())


def test_model_rpcs_unavailable_until_a_model_is_loaded():
    async def body() -> None:
        async with running() as server:
            for call in (
                server.stub.Describe(pb.DescribeRequest()),
                server.stub.Velocity(velocity_request()),
                server.stub.LogProb(pb.LogProbRequest(x=tensor(X))),
                server.stub.Prepare(pb.PrepareRequest()),
                server.stub.Propose(pb.ProposeRequest(mode=pb.PROPOSE_MODE_PROJECT)),
                server.stub.Encode(pb.EncodeRequest()),
                server.stub.Decode(pb.DecodeRequest()),
            ):
                code, err = await rpc_error(call)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert err is not None and err.field == "model"

    run(body())
