"""Bad input to flow experts over gRPC: each refused with its code and field; the server serves on.

A real host with the FLUX (then the Wan) adapter loads tiny folders through ``LoadModel``;
every bad request gets INVALID_ARGUMENT or NOT_FOUND naming the field, no reply reveals the
model root, and a good call afterwards still answers.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from helpers.server import collect, rpc_error, run, running
from helpers.timing import scaled

from poegen.expert_servers.flow import FluxAdapter, WanAdapter
from poegen.expert_servers.server import ServerConfig
from poegen.kernel import codec
from poegen.kernel.refusal import Code
from poegen.v1 import expert_pb2 as pb

ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _velocity(x: torch.Tensor, sigma: torch.Tensor, handle: str = "") -> pb.VelocityRequest:
    return pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma), handle=handle)


def _condition(text: str = "", **tensors: torch.Tensor) -> pb.PrepareRequest:
    condition = pb.Condition(text=text)
    for name, t in tensors.items():
        condition.tensors[name].CopyFrom(codec.encode(t))
    return pb.PrepareRequest(condition=condition)


async def _load(stub: Any, model_id: str) -> list[pb.LoadModelResponse]:
    request = pb.LoadModelRequest(model_id=model_id, options={"max_sequence_length": "16"})
    return await collect(stub.LoadModel(request, metadata=ADMIN_MD))


def _check(
    outcome: tuple[grpc.StatusCode, Any], code: grpc.StatusCode, field: str, root: str
) -> None:
    got_code, err = outcome
    assert got_code == code, outcome
    assert err is not None and err.field == field, err
    assert root not in err.reason


def test_flux_server_refuses_bad_input_and_keeps_serving(flow_models):
    for name in ("flux", "sd3"):
        flow_models.path(name)
    root = str(flow_models.root)
    x, sigma = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4])

    async def body() -> None:
        config = ServerConfig(model_root=flow_models.root, admin_token=ADMIN)
        async with running(config, adapter=FluxAdapter()) as server:
            stub = server.stub
            assert (await _load(stub, "flux"))[-1].stage == pb.LOAD_STAGE_READY
            handle = (await stub.Prepare(_condition("a cat"))).handle
            good = codec.decode(
                (await stub.Velocity(_velocity(x, sigma, handle))).velocity, field="v"
            )
            bad_calls = [
                (stub.Velocity(_velocity(torch.randn(2, 4, 8, 8), sigma, handle)), INVALID, "x.shape"),
                (stub.Velocity(_velocity(torch.randn(2, 16, 7, 8), sigma, handle)), INVALID, "x.shape"),
                (stub.Velocity(_velocity(torch.randn(2, 16, 2, 8, 8), sigma, handle)), INVALID, "x.shape"),
                (stub.Velocity(_velocity(x, torch.tensor([0.0, 0.5]), handle)), INVALID, "sigma"),
                (stub.Velocity(_velocity(x, torch.tensor([1.5, 0.5]), handle)), INVALID, "sigma"),
                (stub.Velocity(_velocity(x, sigma, "no-such-handle")), NOT_FOUND, "handle"),
                (stub.Prepare(_condition("a", foo=torch.ones(2))), INVALID, "condition.tensors[foo]"),
                (stub.Prepare(_condition("a", box=torch.tensor([0, 0, 3, 4]))), INVALID,
                 "condition.tensors[box]"),
                (stub.Encode(pb.EncodeRequest(pixels=codec.encode(torch.zeros(1, 4, 16, 16))))
                 , INVALID, "pixels.shape"),
                (stub.Decode(pb.DecodeRequest(latents=codec.encode(torch.zeros(1, 3, 8, 8))))
                 , INVALID, "latents.shape"),
                (stub.Schedule(pb.ScheduleRequest(num_steps=4, sample_shape=[16, 7, 8])), INVALID,
                 "sample_shape"),
            ]  # fmt: skip
            for call, code, field in bad_calls:
                _check(await rpc_error(call), code, field, root)
            # a box that does not fit the latent grid: refused at the call that meets the grid
            boxed = (await stub.Prepare(_condition("a", box=torch.tensor([4, 4, 6, 4])))).handle
            _check(await rpc_error(stub.Velocity(_velocity(x, sigma, boxed))), INVALID,
                   "condition.tensors[box]", root)  # fmt: skip
            # a folder of another family, and a missing folder
            _check(await rpc_error(_load(stub, "sd3")), INVALID, "model_id", root)
            _check(await rpc_error(_load(stub, "missing")), NOT_FOUND, "model_id", root)
            again = await stub.Velocity(_velocity(x, sigma, handle))
            torch.testing.assert_close(
                codec.decode(again.velocity, field="v"), good, rtol=0, atol=0
            )

    run(body(), timeout=scaled(120))


def test_wan_image_to_video_refuses_bad_conditions(flow_models):
    flow_models.path("wan_i2v")
    root = str(flow_models.root)
    image = torch.zeros(3, 32, 32)

    async def body() -> None:
        config = ServerConfig(model_root=flow_models.root, admin_token=ADMIN)
        async with running(config, adapter=WanAdapter()) as server:
            stub = server.stub
            assert (await _load(stub, "wan_i2v"))[-1].stage == pb.LOAD_STAGE_READY

            def prepare(frames: float, **tensors: torch.Tensor) -> Any:
                request = _condition("a ball", **tensors)
                request.condition.scalars["num_frames"] = frames
                return stub.Prepare(request)

            for call, field in [
                (prepare(9.0), "condition.tensors[image]"),
                (prepare(8.0, image=image), "condition.scalars[num_frames]"),
                (prepare(9.0, image=torch.full((3, 32, 32), 3.0)), "condition.tensors[image]"),
                (prepare(9.0, image=torch.zeros(3, 30, 32)), "condition.tensors[image].shape"),
            ]:
                _check(await rpc_error(call), INVALID, field, root)
            handle = (await prepare(9.0, image=image)).handle
            sigma = torch.tensor([0.5])
            wrong_grid = _velocity(torch.randn(1, 16, 2, 4, 4), sigma, handle)
            _check(await rpc_error(stub.Velocity(wrong_grid)), INVALID, "x.shape", root)
            reply = await stub.Velocity(_velocity(torch.randn(1, 16, 3, 4, 4), sigma, handle))
            assert codec.decode(reply.velocity, field="v").shape == (1, 16, 3, 4, 4)

    run(body(), timeout=scaled(120))


@pytest.mark.parametrize(
    ("options", "field"),
    [({"torch_dtype": "float8"}, "options[torch_dtype]"), ({"cpu_offload": "yes"}, "options[cpu_offload]"),
     ({"guidance_scale": "nan"}, "options[guidance_scale]"), ({"steps": "3"}, "options[steps]"),
     ({"device": "not-a-device"}, "options[device]")],
)  # fmt: skip
def test_bad_load_options_name_the_option(flow_models, options, field):
    from poegen.expert_servers.server import ModelRef
    from poegen.kernel.errors import ExpertError

    with pytest.raises(ExpertError) as err:
        FluxAdapter().load(ModelRef("flux", flow_models.path("flux")), options, lambda f, m: None)
    assert err.value.field == field and err.value.code == Code.INVALID_ARGUMENT
