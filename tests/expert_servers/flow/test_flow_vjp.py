"""VelocityVjp of the flow experts (capability VJP): J_v(x)ᵀ·c by autograd through the real
diffusers models, in process and over gRPC.

The reference is independent of autograd: for random directions u, ⟨Jᵀc, u⟩ must equal the
central difference (⟨c, v(x + h·u)⟩ − ⟨c, v(x − h·u)⟩) / 2h of the expert's own velocity (in
float32, so to about 1e-2 relative). Over the wire the reply equals the in-process VJP of the same
prepared condition; bad cotangents are refused naming the field, and the server goes on serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from helpers.remote import LoopThread

from poegen.expert_servers.flow import FlowAdapter, FluxAdapter, SD3Adapter, WanAdapter
from poegen.expert_servers.server import Condition, ModelRef
from poegen.kernel import codec
from poegen.kernel.experts import Capability, check_expert
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError
from poegen.v1 import expert_pb2 as pb


@dataclass(frozen=True)
class Case:
    folder: str
    adapter: Any
    shape: tuple[int, ...]
    condition: Condition = field(default_factory=Condition)

    def wire_condition(self) -> pb.Condition:
        c = self.condition
        return pb.Condition(
            text=c.text, negative_text=c.negative_text, scalars=dict(c.scalars),
            tensors={name: codec.encode(t) for name, t in c.tensors.items()},
        )  # fmt: skip


CASES = {
    "flux": Case("flux", FluxAdapter, (16, 4, 4), Condition(text="a red cube")),
    "flux_box": Case(
        "flux", FluxAdapter, (16, 4, 6),
        Condition(text="a cube", tensors={"box": torch.tensor([0.0, 2, 4, 4])}),
    ),
    "sd3": Case(  # classifier-free guidance: two passes through the transformer
        "sd3", SD3Adapter, (4, 4, 4),
        Condition(text="a cube", negative_text="blurry", scalars={"guidance_scale": 4.0}),
    ),
    "wan": Case("wan", WanAdapter, (16, 2, 4, 4), Condition(text="a ball falls")),
    "unet_classes": Case(
        "unet_classes", FlowAdapter, (1, 16, 16), Condition(scalars={"class_label": 3.0})
    ),
}  # fmt: skip


def _served(flow_models: Any, case: Case) -> Any:
    ref = ModelRef(case.folder, flow_models.path(case.folder))
    options = {} if case.adapter is FlowAdapter else {"max_sequence_length": "16"}
    return case.adapter().load(ref, options, lambda f, m: None).expert


def _inputs(shape: tuple[int, ...], batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn((batch, *shape), generator=g)
    cotangent = torch.randn((batch, *shape), generator=g)
    return x, torch.tensor([0.7, 0.3])[:batch], cotangent


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_vjp_is_the_transpose_of_the_velocitys_derivative(flow_models, name) -> None:
    case = CASES[name]
    expert = _served(flow_models, case)
    assert check_expert(expert).supports(Capability.VJP)
    view = expert.prepare(case.condition)
    x, sigma, cotangent = _inputs(case.shape)
    vjp = view.velocity_vjp(x, sigma, cotangent)
    assert vjp.shape == x.shape and vjp.dtype == x.dtype and torch.isfinite(vjp).all()
    h = 1e-2
    for k in range(3):
        u = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k))
        ahead = (cotangent * view.velocity(x + h * u, sigma)).flatten(1).sum(1)
        behind = (cotangent * view.velocity(x - h * u, sigma)).flatten(1).sum(1)
        difference = (ahead - behind) / (2 * h)
        torch.testing.assert_close((vjp * u).flatten(1).sum(1), difference, rtol=2e-2, atol=2e-3)
    if name == "flux_box":  # zero velocity outside the box: the VJP is zero there too
        assert torch.equal(vjp[..., :, :2], torch.zeros_like(vjp[..., :, :2]))


@pytest.mark.parametrize("name", ["flux", "unet_classes"])
def test_over_grpc_the_vjp_is_the_in_process_one(loop: LoopThread, flow_models, name) -> None:
    case = CASES[name]
    expert = _served(flow_models, case)
    address = loop.serve(expert, model_id=case.folder).address
    x, sigma, cotangent = _inputs(case.shape)
    local = expert.prepare(case.condition).velocity_vjp(x, sigma, cotangent)
    with RemoteExpert.connect(address, condition=case.wire_condition()) as remote:
        assert remote.describe().supports(Capability.VJP)
        torch.testing.assert_close(remote.velocity_vjp(x, sigma, cotangent), local)
        # what a cotangent must be, each refusal naming its field; the server goes on serving
        for bad, where in (
            (cotangent[:1], "cotangent.shape"),
            (torch.full_like(cotangent, float("nan")), "cotangent"),
        ):
            with pytest.raises(RemoteExpertError) as info:
                remote.velocity_vjp(x, sigma, bad)
            assert info.value.code == Code.INVALID_ARGUMENT and info.value.field == where
        torch.testing.assert_close(remote.velocity_vjp(x, sigma, cotangent), local)


def test_a_request_without_cotangent_or_of_an_expert_without_vjp_is_refused(
    loop: LoopThread, flow_models
) -> None:
    from poegen.expert_servers.analytic import LinearReward

    address = loop.serve(_served(flow_models, CASES["unet_classes"])).address
    reward = loop.serve(LinearReward([1.0, 0.0])).address
    x, sigma, _ = _inputs((1, 16, 16))
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/poegen.v1.ExpertService/VelocityVjp",
            request_serializer=pb.VelocityVjpRequest.SerializeToString,
            response_deserializer=pb.VelocityVjpResponse.FromString,
        )
        request = pb.VelocityVjpRequest(x=codec.encode(x), sigma=codec.encode(sigma))
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cotangent" in info.value.details()
        wrong = pb.VelocityVjpRequest()
        wrong.CopyFrom(request)
        wrong.cotangent.CopyFrom(codec.encode(x.double()))
        with pytest.raises(grpc.RpcError) as info:
            call(wrong)
        assert "cotangent.dtype" in info.value.details()
    with grpc.insecure_channel(reward) as channel:
        call = channel.unary_unary(
            "/poegen.v1.ExpertService/VelocityVjp",
            request_serializer=pb.VelocityVjpRequest.SerializeToString,
            response_deserializer=pb.VelocityVjpResponse.FromString,
        )
        x2 = torch.zeros(3, 2)
        request = pb.VelocityVjpRequest(
            x=codec.encode(x2), sigma=codec.encode(torch.full((3,), 0.5)),
            cotangent=codec.encode(x2),
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
