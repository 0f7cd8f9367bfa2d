"""FLUX Fill: the expert equals ``FluxFillPipeline``; its image and mask are prepared once;
bad conditions are refused over gRPC; ``poegen serve flux_fill`` (docs/flow.md) serves it.

The pipeline is fed the raw image and mask (its own preprocessing: mask binarisation, masked
image, VAE, ``prepare_mask_latents``). It samples the masked image's VAE posterior where the
expert takes the mode; the tiny folder's posterior has σ = 3e-7
(:func:`helpers.flow_models.build_flux_fill`), so the two differ by that noise, well under the
1e-5 of the other families' parity tests.
"""

from __future__ import annotations

import shlex
from typing import Any

import grpc
import pytest
import torch
from diffusers import FluxFillPipeline, FluxPipeline
from helpers.docs import docs_section
from helpers.remote import LoopThread, free_port
from helpers.server import collect, rpc_error, run, running, start_process
from helpers.timing import scaled

from poegen.expert_servers.flow import FluxFillAdapter
from poegen.expert_servers.server import Condition, ModelRef, ServerConfig
from poegen.kernel import codec
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2 as pb

PROMPT, STEPS, SEED, GUIDANCE = "a red cube on a table", 4, 7, 30.0
SHAPE = (16, 8, 8)  # 16×16 pixels, the tiny VAE's scale factor 2
OPTIONS = {"max_sequence_length": "16"}
ADMIN = "admin-secret"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _image_and_mask(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """An image in [-1, 1] on a grid of k/128 − 1 (so (x + 1)/2, the pipeline's [0, 1]
    convention, and back are exact) and a soft mask (both sides binarise it at 0.5)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, 16, 16), generator=g) / 128 - 1
    return image, torch.rand(1, 16, 16, generator=g)


def _expert(flow_models: Any) -> Any:
    ref = ModelRef("flux_fill", flow_models.path("flux_fill"))
    return FluxFillAdapter().load(ref, OPTIONS, lambda f, m: None).expert


def _pipeline(flow_models: Any) -> FluxFillPipeline:
    pipe = FluxFillPipeline.from_pretrained(flow_models.path("flux_fill"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(
    pipe: FluxFillPipeline, noise: torch.Tensor, steps: int, prompt: str | list[str] = PROMPT
) -> torch.Tensor:
    """The pipeline's output latents (unpacked) from initial latents ``noise`` (B, 16, 8, 8)."""
    image, mask = _image_and_mask()
    out = pipe(
        prompt, image=(image + 1) / 2, mask_image=mask,
        latents=FluxPipeline._pack_latents(noise, noise.shape[0], *SHAPE),
        num_inference_steps=steps, guidance_scale=GUIDANCE, height=16, width=16,
        output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    return FluxPipeline._unpack_latents(out, 16, 16, pipe.vae_scale_factor)


def _condition() -> pb.Condition:
    image, mask = _image_and_mask()
    condition = pb.Condition(text=PROMPT, scalars={"guidance_scale": GUIDANCE})
    condition.tensors["image"].CopyFrom(codec.encode(image))
    condition.tensors["mask"].CopyFrom(codec.encode(mask))
    return condition


def test_one_velocity_equals_the_pipelines_step(flow_models):
    """Two particles at σ = 1: the pipeline's one-step loop gives x − v(x, 1)."""
    expert = _expert(flow_models)
    image, mask = _image_and_mask()
    view = expert.prepare(Condition(text=PROMPT, tensors={"image": image, "mask": mask}))
    assert view.guidance == GUIDANCE  # FluxFillPipeline's default, not FLUX's 3.5
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    got = view.velocity(x, torch.ones(2))
    want = x - _pipeline_latents(_pipeline(flow_models), x, 1, [PROMPT, PROMPT])
    assert (got - want).abs().max() <= 1e-5
    # the fill tokens matter: another mask, another velocity
    other = expert.prepare(Condition(text=PROMPT, tensors={"image": image, "mask": 1 - mask}))
    assert not torch.allclose(other.velocity(x, torch.ones(2)), got)


def test_euler_run_over_grpc_equals_the_pipeline(loop: LoopThread, flow_models):
    ref = ModelRef("flux_fill", flow_models.path("flux_fill"))
    served = FluxFillAdapter().load(ref, OPTIONS, lambda f, m: None)
    address = loop.serve(served, model_id="flux_fill").address
    settings = SamplerSettings(
        num_particles=1, mcmc_steps=0, transition="euler", num_steps=STEPS, schedule="expert"
    )
    with RemoteExpert.connect(address, condition=_condition()) as remote:
        info = remote.describe()
        result = sample(
            [Factor(remote)], SHAPE, settings, generator=torch.Generator().manual_seed(SEED)
        )
    assert (info.name, info.latent_space, info.latent_layout.packing) == (
        "flux_fill", "flux-vae-16", "2x2"
    )  # fmt: skip
    # the kernel's first draw: x ~ N(0, I) of shape (N, *S) from its generator
    noise = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(SEED))
    want = _pipeline_latents(_pipeline(flow_models), noise, STEPS)
    assert want.shape == result.particles.shape
    assert (result.particles - want).abs().max() <= 1e-5
    assert [step.experts["flux_fill"].calls for step in result.trace] == [2] + [1] * (STEPS - 2)


def test_image_mask_and_prompt_are_encoded_once_per_condition(flow_models):
    expert = _expert(flow_models)
    encoders = [expert.pipe.text_encoder, expert.pipe.text_encoder_2, expert.pipe.vae.encoder]
    calls = [0] * len(encoders)

    def counter(i: int) -> Any:
        def count(module: Any, args: Any, output: Any) -> None:
            calls[i] += 1

        return count

    hooks = [encoder.register_forward_hook(counter(i)) for i, encoder in enumerate(encoders)]
    try:
        image, mask = _image_and_mask()
        view = expert.prepare(Condition(text=PROMPT, tensors={"image": image, "mask": mask}))
        prepared = list(calls)
        settings = SamplerSettings(num_particles=2, mcmc_steps=1, num_steps=3, schedule="expert")
        sample([Factor(view)], SHAPE, settings, generator=torch.Generator().manual_seed(SEED))
    finally:
        for hook in hooks:
            hook.remove()
    assert prepared == [1, 1, 1]  # CLIP, T5, the VAE encoder on the masked image
    assert calls == prepared  # nothing encoded while sampling


def _prepare(stub: Any, text: str = "a cat", negative: str = "", **entries: Any) -> Any:
    """A Prepare call; float entries are scalars, tensors are condition tensors."""
    condition = pb.Condition(text=text, negative_text=negative)
    for name, t in entries.items():
        if isinstance(t, float):
            condition.scalars[name] = t
        else:
            condition.tensors[name].CopyFrom(codec.encode(t))
    return stub.Prepare(pb.PrepareRequest(condition=condition))


def test_bad_fill_conditions_are_refused_over_grpc(flow_models):
    for name in ("flux_fill", "flux"):
        flow_models.path(name)
    root = str(flow_models.root)
    image, mask = _image_and_mask()
    nan_image = image.clone()
    nan_image[0, 0, 0] = float("nan")
    x, sigma = torch.randn(1, *SHAPE), torch.tensor([0.5])

    def check(outcome: tuple[grpc.StatusCode, Any], field: str) -> None:
        code, err = outcome
        assert code == INVALID and err is not None and err.field == field, outcome
        assert root not in err.reason

    async def body() -> None:
        config = ServerConfig(model_root=flow_models.root, admin_token=ADMIN)
        async with running(config, adapter=FluxFillAdapter()) as server:
            stub = server.stub
            metadata = (("x-poegen-admin-token", ADMIN),)

            def load(model_id: str, **options: str) -> Any:
                request = pb.LoadModelRequest(model_id=model_id, options={**OPTIONS, **options})
                return collect(stub.LoadModel(request, metadata=metadata))

            assert (await load("flux_fill"))[-1].stage == pb.LOAD_STAGE_READY
            image_field, mask_field = "condition.tensors[image]", "condition.tensors[mask]"
            bad = [
                (_prepare(stub, mask=mask), image_field),  # no image
                (_prepare(stub, image=image), mask_field),  # no mask
                (_prepare(stub, image=image[:1], mask=mask), image_field),  # 1 channel
                (_prepare(stub, image=image * 2, mask=mask), image_field),  # outside [-1, 1]
                (_prepare(stub, image=nan_image, mask=mask), image_field),
                (_prepare(stub, image=image.long(), mask=mask), image_field),  # not floating
                (_prepare(stub, image=image, mask=mask - 0.5), mask_field),  # outside [0, 1]
                (_prepare(stub, image=image, mask=mask.expand(3, -1, -1)), mask_field),
                (_prepare(stub, image=image, mask=mask[..., :8]), f"{mask_field}.shape"),
                (_prepare(stub, image=image[..., :14], mask=mask[..., :14]),
                 f"{image_field}.shape"),  # not a multiple of 2·s = 4
                (_prepare(stub, image=image, mask=mask, box=torch.tensor([0, 0, 4, 4])),
                 "condition.tensors[box]"),
                (_prepare(stub, image=image, mask=mask, true_cfg_scale=2.0),
                 "condition.scalars[true_cfg_scale]"),
                (_prepare(stub, negative="blurry", image=image, mask=mask),
                 "condition.negative_text"),
                (load("flux"), "model_id"),  # a FluxPipeline folder
                (load("flux_fill", true_cfg_scale="2"), "options[true_cfg_scale]"),
            ]  # fmt: skip
            for call, field in bad:
                check(await rpc_error(call), field)
            handle = (await _prepare(stub, image=image, mask=mask)).handle
            small = pb.VelocityRequest(
                x=codec.encode(torch.randn(1, 16, 4, 4)), sigma=codec.encode(sigma), handle=handle
            )
            check(await rpc_error(stub.Velocity(small)), "x.shape")  # not the image's grid
            good = pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma), handle=handle)
            reply = await stub.Velocity(good)
            assert codec.decode(reply.velocity, field="v").shape == (1, *SHAPE)

    run(body(), timeout=scaled(120))


def test_the_docs_serve_command_runs_as_written(flow_models):
    """docs/flow.md, "FLUX Fill": ``poegen serve flux_fill`` as a process, the folder swapped
    for the tiny one, its port made free; it answers as the expert in-process, bit for bit."""
    (command,) = docs_section("FLUX Fill (inpainting)", "flow.md")
    assert command.startswith("poegen serve flux_fill ")
    port = free_port()
    folder = flow_models.path("flux_fill")
    as_run = command.replace("/models/FLUX.1-Fill-dev", str(folder))
    process = start_process(
        ["-m", "poegen.clients.cli", *shlex.split(as_run.replace("50061", str(port)))[1:]],
        env={"HF_HUB_OFFLINE": "1"}, timeout=scaled(90),
    )  # fmt: skip
    try:
        local = FluxFillAdapter().load(ModelRef("flux_fill", folder), {}, lambda f, m: None)
        image, mask = _image_and_mask()
        view = local.expert.prepare(Condition(text=PROMPT, tensors={"image": image, "mask": mask}))
        x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
        sigma = torch.tensor([0.9, 0.3])
        condition = _condition()
        del condition.scalars["guidance_scale"]  # the command's default guidance
        with RemoteExpert.connect(f"127.0.0.1:{port}", condition=condition, retries=30) as remote:
            assert remote.describe().name == "flux_fill"
            assert remote.schedule(STEPS, SHAPE) == local.expert.schedule(STEPS, SHAPE)
            torch.testing.assert_close(
                remote.velocity(x, sigma), view.velocity(x, sigma), rtol=0, atol=0
            )
    finally:
        assert process.stop() == 0


def test_the_experts_own_velocity_needs_a_fill_condition(flow_models):
    """The expert's own velocity is the empty condition's: FLUX Fill has no image to fill."""
    from poegen.kernel.errors import ExpertError

    with pytest.raises(ExpertError) as err:
        _expert(flow_models).velocity(torch.randn(1, *SHAPE), torch.tensor([0.5]))
    assert (err.value.field, err.value.code) == ("condition.tensors[image]", Code.INVALID_ARGUMENT)


def test_the_generic_flow_adapter_points_a_fill_folder_to_flux_fill(flow_models) -> None:
    from poegen.expert_servers.flow import FlowAdapter
    from poegen.kernel.errors import ExpertError

    ref = ModelRef("flux_fill", flow_models.path("flux_fill"))
    with pytest.raises(ExpertError, match="serve it with the 'flux_fill' adapter"):
        FlowAdapter().load(ref, {}, lambda fraction, message: None)
