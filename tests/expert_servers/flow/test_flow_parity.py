"""The key test: one flow expert behind a real gRPC server equals the diffusers pipeline.

One particle, zero MCMC steps, the expert's own schedule (``schedule="expert"`` → the
``Schedule`` RPC → the family's FlowMatchEulerDiscreteScheduler): the kernel's Euler
transitions reproduce the pipeline's ``__call__`` for the same initial latents (the kernel's
first draw from its generator, handed to the pipeline through ``latents=``, packed for FLUX),
prompt, negative prompt, guidance and number of steps. Then two experts of one family with
different prompts and regions sample with MCMC, and the trace shows the calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline
from helpers.remote import LoopThread
from helpers.timing import scaled

from poegen.expert_servers.flow import FluxAdapter, SD3Adapter, WanAdapter
from poegen.expert_servers.server import Condition, ModelRef
from poegen.kernel import codec
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2 as pb

PROMPT, NEGATIVE, SEED, STEPS = "a red cube on a table", "blurry", 7, 4


@dataclass(frozen=True)
class Family:
    name: str
    adapter: Any
    pipeline: Any
    shape: tuple[int, ...]  # latent sample shape
    call: dict[str, Any]  # extra pipeline arguments
    guidance: float


FAMILIES = {
    "flux": Family("flux", FluxAdapter, FluxPipeline, (16, 8, 8), dict(height=16, width=16), 3.5),
    "sd3": Family(
        "sd3", SD3Adapter, StableDiffusion3Pipeline, (4, 8, 8),
        dict(height=16, width=16, negative_prompt=NEGATIVE), 4.0,
    ),
    "wan": Family(
        "wan", WanAdapter, WanPipeline, (16, 3, 4, 4),
        dict(height=32, width=32, num_frames=9, negative_prompt=NEGATIVE), 5.0,
    ),
}  # fmt: skip


def _serve(loop: LoopThread, flow_models: Any, family: Family) -> str:
    ref = ModelRef(family.name, flow_models.path(family.name))
    served = family.adapter().load(ref, {"max_sequence_length": "16"}, lambda f, m: None)
    return loop.serve(served, model_id=family.name).address


def _condition(family: Family, text: str = PROMPT) -> pb.Condition:
    condition = pb.Condition(text=text, scalars={"guidance_scale": family.guidance})
    if family.name != "flux":
        condition.negative_text = NEGATIVE
    return condition


def _pipeline_latents(family: Family, folder: Any, noise: torch.Tensor) -> torch.Tensor:
    """The pipeline's output latents (unpacked) for initial latents ``noise``."""
    pipe = family.pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = noise
    if family.name == "flux":
        latents = FluxPipeline._pack_latents(noise, 1, *family.shape)
    out = pipe(
        PROMPT, latents=latents, num_inference_steps=STEPS, guidance_scale=family.guidance,
        output_type="latent", max_sequence_length=16, **family.call,
    )  # fmt: skip
    result = out.frames if family.name == "wan" else out.images
    if family.name == "flux":
        result = FluxPipeline._unpack_latents(result, 16, 16, pipe.vae_scale_factor)
    return result


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_expert_over_grpc_equals_the_pipeline(loop, flow_models, name):
    family = FAMILIES[name]
    address = _serve(loop, flow_models, family)
    settings = SamplerSettings(
        num_particles=1, mcmc_steps=0, transition="euler", num_steps=STEPS, schedule="expert"
    )
    with RemoteExpert.connect(address, condition=_condition(family)) as remote:
        result = sample(
            [Factor(remote)], family.shape, settings, generator=torch.Generator().manual_seed(SEED)
        )
        layout = remote.describe().latent_layout  # the layout crosses the wire in Describe
    assert layout is not None and layout.channels == family.shape[0]
    assert layout.packing == ("2x2" if name == "flux" else "none")
    # the kernel's first draw: x ~ N(0, I) of shape (N, *S) from its generator
    noise = torch.randn((1, *family.shape), generator=torch.Generator().manual_seed(SEED))
    want = _pipeline_latents(family, flow_models.path(name), noise)
    assert want.shape == result.particles.shape
    assert (result.particles - want).abs().max() <= 1e-5
    assert [step.experts[name].calls for step in result.trace] == [2] + [1] * (STEPS - 2)
    assert result.experts[0].model_id == name


def test_two_regional_flux_experts_sample_with_mcmc(loop, flow_models):
    family = FAMILIES["flux"]
    address = _serve(loop, flow_models, family)
    left = torch.zeros(family.shape)
    left[..., :4] = 1.0
    settings = SamplerSettings(
        num_particles=2, mcmc_steps=2, num_steps=3, schedule="expert", step_size=0.5
    )
    with (
        RemoteExpert.connect(address, condition=_condition(family, "a cat")) as cat,
        RemoteExpert.connect(address, condition=_condition(family, "a dog")) as dog,
    ):
        result = sample(
            [Factor(cat, region=left, name="cat"), Factor(dog, region=1 - left, name="dog")],
            family.shape,
            settings,
            generator=torch.Generator().manual_seed(SEED),
        )
        cat_v = cat.velocity(result.particles, torch.full((2,), 0.5))
        dog_v = dog.velocity(result.particles, torch.full((2,), 0.5))
    assert result.particles.shape == (2, *family.shape)
    assert torch.isfinite(result.particles).all()
    assert not torch.allclose(cat_v, dog_v)  # two prompts, two conditions
    # per level and expert: the transition's evaluation + one per ULA step (+ the first level's
    # initial evaluation at σ_0)
    calls = [(step.experts["cat"].calls, step.experts["dog"].calls) for step in result.trace]
    assert calls == [(4, 4), (3, 3)]
    assert all(
        step.experts["cat"].samples == 2 * step.experts["cat"].calls for step in result.trace
    )


def test_region_that_does_not_fit_the_latent_grid_is_refused(loop, flow_models):
    family = FAMILIES["flux"]
    address = _serve(loop, flow_models, family)
    with (
        RemoteExpert.connect(address, condition=_condition(family)) as remote,
        pytest.raises(ValueError, match="region"),
    ):
        sample(
            [Factor(remote, region=torch.ones(16, 4, 4))],
            family.shape,
            SamplerSettings(num_particles=1, mcmc_steps=0, transition="euler", num_steps=2),
            generator=torch.Generator().manual_seed(0),
        )


def test_sampler_service_with_a_flux_expert_equals_the_pipeline(loop, flow_models):
    """The product path: a Generate job on the Sampler service, the expert on its own host."""
    import grpc

    from poegen.kernel.errors import from_rpc_error
    from poegen.v1 import sampler_pb2, sampler_pb2_grpc

    family = FAMILIES["flux"]
    address = _serve(loop, flow_models, family)
    sampler = loop.sampler()
    settings = sampler_pb2.SamplerSettings(
        num_particles=1, mcmc_steps=0, transition="euler", num_steps=STEPS, schedule="expert"
    )

    def request(region: torch.Tensor | None = None) -> sampler_pb2.GenerateRequest:
        factor = sampler_pb2.FactorSpec(address=address, condition=_condition(family))
        if region is not None:
            factor.region.CopyFrom(codec.encode(region))
        return sampler_pb2.GenerateRequest(
            factors=[factor], sample_shape=list(family.shape), settings=settings, seed=SEED
        )

    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        replies = list(stub.Generate(request()))
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(request(torch.ones(16, 4, 4))))
    particles = codec.decode(replies[-1].result.particles, field="particles")
    noise = torch.randn((1, *family.shape), generator=torch.Generator().manual_seed(SEED))
    want = _pipeline_latents(family, flow_models.path("flux"), noise)
    assert (particles - want).abs().max() <= 1e-5
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "region" in from_rpc_error(failed.value).field


@pytest.mark.slow  # a process start imports torch and diffusers again: ~10-30 s on 2 cores
def test_poegen_serve_flux_process_answers_the_same(flow_models):
    """``poegen serve flux --model DIR``: the entry point, a separate process, the same numbers."""
    from helpers.server import start_process

    family = FAMILIES["flux"]
    folder = flow_models.path("flux")
    process = start_process(
        ["-m", "poegen.clients.cli", "serve", "flux", "--model", str(folder), "--option",
         "max_sequence_length=16", "--host", "127.0.0.1", "--port", "0"],
        env={"HF_HUB_OFFLINE": "1"}, timeout=scaled(60),
    )  # fmt: skip
    try:
        local = family.adapter().load(
            ModelRef("flux", folder), {"max_sequence_length": "16"}, lambda f, m: None
        )
        view = local.expert.prepare(Condition(text=PROMPT, scalars={"guidance_scale": 3.5}))
        x = torch.randn(2, *family.shape, generator=torch.Generator().manual_seed(1))
        sigma = torch.tensor([0.9, 0.3])
        with RemoteExpert.connect(
            f"127.0.0.1:{process.port}", condition=_condition(family), retries=30
        ) as remote:
            assert remote.describe().latent_space == "flux-vae-16"
            assert remote.schedule(STEPS, family.shape) == local.expert.schedule(
                STEPS, family.shape
            )
            torch.testing.assert_close(
                remote.velocity(x, sigma), view.velocity(x, sigma), rtol=0, atol=0
            )
    finally:
        assert process.stop() == 0
