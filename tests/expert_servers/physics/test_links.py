"""Condition links through the Sampler service, end to end over real gRPC: a MuJoCo scene on
the physics server renders depth that flows into a tiny FLUX depth-control expert's Prepare
(the same job as passing the depth by hand, bit for bit), and the physics server's projection
constraint, in FLUX's latent space, keeps the objects' region of the final sample on the
encoded rendering. Plus the link errors, each naming its field."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest
import torch
from helpers.remote import LoopThread, Served
from helpers.timing import scaled

from poegen.expert_servers.flow import FluxAdapter
from poegen.expert_servers.physics import PhysicsAdapter
from poegen.expert_servers.server import ModelRef
from poegen.kernel import codec
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError
from poegen.v1 import expert_pb2, sampler_pb2, sampler_pb2_grpc

SCENE = """
objects:
  - {name: ball, shape: sphere, size: [0.45], position: [0, 0, 0.45], colour: [0.9, 0.2, 0.1]}
camera: {position: [0, -3, 0.8], look_at: [0, 0, 0.4], fov: 45}
width: 16
height: 16
"""
SHAPE = [16, 8, 8]  # FLUX latents of 16×16 pixels (the tiny VAE halves each side)
SIGMAS = (1.0, 0.7, 0.4, 0.15, 0.03, 0.004)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _progress(fraction: float, message: str) -> None:
    del fraction, message


@pytest.fixture(scope="module")
def stack(flow_models, tmp_path_factory) -> Iterator[dict[str, Served]]:
    root = tmp_path_factory.mktemp("physics-assets")
    shutil.copytree(flow_models.path("flux_depth"), root / "flux_depth")
    flux = FluxAdapter().load(ModelRef("flux_depth", root / "flux_depth"), {}, _progress)
    physics = PhysicsAdapter().load(
        ModelRef("assets", root),
        {"autoencoder": "flux:flux_depth", "moves": "project", "mask_mode": "all", "weight": "4"},
        _progress,
    )
    loop = LoopThread()
    try:
        yield {
            "flux": loop.serve(flux),
            "physics": loop.serve(physics),
            "sampler": loop.sampler(),
        }
    finally:
        loop.close()


def _generate(sampler: Served, request: sampler_pb2.GenerateRequest) -> torch.Tensor:
    with grpc.insecure_channel(sampler.address) as channel:
        replies = list(
            sampler_pb2_grpc.SamplerServiceStub(channel).Generate(request, timeout=scaled(120))
        )
    return codec.decode(replies[-1].result.particles, field="particles")


def _failure(sampler: Served, request: sampler_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(sampler.address) as channel:
        try:
            list(
                sampler_pb2_grpc.SamplerServiceStub(channel).Generate(request, timeout=scaled(120))
            )
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            return e.code(), "" if err is None else err.field
    raise AssertionError("the job succeeded")


def _request(
    stack: dict[str, Served],
    *,
    depth: torch.Tensor | None = None,
    links: bool = True,
    constraint: bool = True,
) -> sampler_pb2.GenerateRequest:
    scene = expert_pb2.Condition(text=SCENE)
    flux_condition = expert_pb2.Condition(text="a red ball", scalars={"guidance_scale": 3.5})
    if depth is not None:
        flux_condition.tensors["depth"].CopyFrom(codec.encode(depth))
    flux = sampler_pb2.FactorSpec(
        address=stack["flux"].address,
        condition=flux_condition,
        name="flux",
        links=[sampler_pb2.ConditionLink(tensor="depth", source="sim", output="depth")]
        if links
        else [],
    )
    factors = [flux]
    if constraint:
        factors.append(
            sampler_pb2.FactorSpec(
                address=stack["physics"].address, condition=scene, name="physics"
            )
        )
    return sampler_pb2.GenerateRequest(
        factors=factors,
        sources=[
            sampler_pb2.ConditionSource(
                name="sim", address=stack["physics"].address, condition=scene
            )
        ],
        sample_shape=SHAPE,
        settings=sampler_pb2.SamplerSettings(num_particles=4, mcmc_steps=1, sigmas=SIGMAS),
        seed=3,
    )


def _rendering(stack: dict[str, Served]) -> dict[str, torch.Tensor]:
    with RemoteExpert.connect(
        stack["physics"].address, condition=expert_pb2.Condition(text=SCENE)
    ) as physics:
        return physics.render(["depth", "target", "target_mask"])


def test_depth_flows_from_the_physics_server_into_flux_and_the_constraint_holds(
    stack: dict[str, Served],
) -> None:
    rendered = _rendering(stack)
    assert rendered["depth"].shape == (1, 1, 16, 16) and rendered["depth"].max() == 1
    linked = _generate(stack["sampler"], _request(stack))
    by_hand = _generate(stack["sampler"], _request(stack, depth=rendered["depth"], links=False))
    assert linked.shape == (4, *SHAPE)
    assert torch.equal(linked, by_hand)  # the link delivered exactly the rendered depth
    via_factor = _request(stack)
    via_factor.factors[0].links[0].source = "physics"  # the constraint factor renders it too
    del via_factor.sources[:]
    assert torch.equal(_generate(stack["sampler"], via_factor), linked)
    flat = _generate(
        stack["sampler"], _request(stack, depth=torch.zeros(1, 1, 16, 16), links=False)
    )
    assert not torch.equal(linked, flat)  # and FLUX used it
    # the projection keeps the fully covered latent cells on the encoded rendering
    target, mask = rendered["target"], rendered["target_mask"]
    assert target.shape == tuple(SHAPE) and mask.sum() >= 16 * 4
    inside = mask.bool().expand_as(linked)
    error = (linked - target).abs()[inside].max()
    assert float(error) < 0.1  # ≈ σ_L·(|ε̂| + |v|) at the last level σ_L = 0.004
    free = _generate(stack["sampler"], _request(stack, constraint=False))
    assert float((free - target).abs()[inside].max()) > 5 * float(error)


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        (lambda r: r.factors[0].links[0].__setattr__("source", "nowhere"),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[0].links[0].source"),
        (lambda r: r.factors[0].links[0].__setattr__("source", "flux"),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[0].links[0].source"),
        (lambda r: r.factors[0].links[0].__setattr__("output", "colour"),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[0].links[0].output"),
        (lambda r: r.factors[1].links.add(tensor="x", source="flux", output="depth"),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[1].links[0].source"),
        (lambda r: r.factors[1].links.add(tensor="x", source="nobody", output=""),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[1].links[0].output"),
        (lambda r: r.sources[0].__setattr__("name", "physics"),
         grpc.StatusCode.INVALID_ARGUMENT, "factors[1].name"),
        (lambda r: r.sources[0].__setattr__("address", "nohost"),
         grpc.StatusCode.INVALID_ARGUMENT, "sources[0].address"),
        (lambda r: r.sources[0].condition.__setattr__("text", "objects: [{shape: cone}]"),
         grpc.StatusCode.INVALID_ARGUMENT, "sources[0]"),
    ],
)  # fmt: skip
def test_link_errors_name_their_field(
    stack: dict[str, Served], change, code: grpc.StatusCode, field: str
) -> None:
    request = _request(stack)
    change(request)
    got, got_field = _failure(stack["sampler"], request)
    assert (got, got_field) == (code, field)


def test_links_forming_a_cycle_are_refused(stack: dict[str, Served]) -> None:
    request = _request(stack)
    request.factors[0].links[0].source = "physics"
    request.factors[1].links.add(tensor="depth", source="flux", output="depth")
    assert _failure(stack["sampler"], request) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "factors[0].links",
    )


def test_link_waves_order_factors_after_their_sources() -> None:
    from poegen.kernel.service import FactorPlan, LinkPlan, SourcePlan, link_waves

    def factor(name: str, *sources: str) -> FactorPlan:
        links = tuple(LinkPlan(f"t{i}", s, "o") for i, s in enumerate(sources))
        return FactorPlan("h:1", 1.0, None, None, name, links)

    factors = [factor("a", "b", "src"), factor("b", "c"), factor("c"), factor("", "src")]
    assert link_waves(factors, [SourcePlan("src", "h:1", None)]) == ((2, 3), (1,), (0,))


# ------------------------------------------------------------------ depth-to-video (Wan VACE)


@pytest.fixture(scope="module")
def vace(flow_models, stack) -> Iterator[Served]:
    from poegen.expert_servers.flow import WanAdapter

    served = WanAdapter().load(ModelRef("wan_vace", flow_models.path("wan_vace")), {}, _progress)
    loop = LoopThread()
    try:
        yield loop.serve(served)
    finally:
        loop.close()


def _video_request(
    stack: dict[str, Served], vace: Served, depth: torch.Tensor | None
) -> sampler_pb2.GenerateRequest:
    condition = expert_pb2.Condition(text="a ball falling")
    links = []
    if depth is None:
        links = [sampler_pb2.ConditionLink(tensor="depth", source="sim", output="depth")]
    else:
        condition.tensors["depth"].CopyFrom(codec.encode(depth))
    scene = expert_pb2.Condition(text=SCENE, scalars={"frames": 5, "fps": 8})
    return sampler_pb2.GenerateRequest(
        factors=[sampler_pb2.FactorSpec(address=vace.address, condition=condition, links=links)],
        sources=[
            sampler_pb2.ConditionSource(
                name="sim", address=stack["physics"].address, condition=scene
            )
        ],
        sample_shape=[16, 2, 2, 2],  # 5 frames of 16×16 pixels in Wan's latents
        settings=sampler_pb2.SamplerSettings(num_particles=2, mcmc_steps=0, sigmas=SIGMAS),
        seed=5,
    )


def test_simulated_depth_video_drives_a_depth_to_video_expert(
    stack: dict[str, Served], vace: Served
) -> None:
    with RemoteExpert.connect(
        stack["physics"].address,
        condition=expert_pb2.Condition(text=SCENE, scalars={"frames": 5, "fps": 8}),
    ) as physics:
        depth = physics.render(["depth"])["depth"]
        # this server encodes with FLUX's image VAE: the clip is a source, not a constraint
        with pytest.raises(RemoteExpertError) as err:
            physics.propose(torch.zeros(1, 16, 8, 8), torch.tensor([0.5]), seed=0)
        assert err.value.code == Code.FAILED_PRECONDITION
    assert depth.shape == (5, 1, 16, 16)
    linked = _generate(stack["sampler"], _video_request(stack, vace, None))
    assert linked.shape == (2, 16, 2, 2, 2)
    assert torch.equal(linked, _generate(stack["sampler"], _video_request(stack, vace, depth)))
    flat = _generate(stack["sampler"], _video_request(stack, vace, torch.zeros_like(depth)))
    assert not torch.equal(linked, flat)
