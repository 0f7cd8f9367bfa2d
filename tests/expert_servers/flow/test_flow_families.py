"""FLUX, SD3 and Wan experts in-process: layout, VAE, control/image conditions, boxes, encoders.

The parity of the text-to-image/video experts over gRPC is in ``test_flow_parity``; here the
conditioned variants (FLUX depth control, Wan image-to-video) are compared with their own
pipelines, and the pieces around the velocity are checked one at a time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from diffusers import (
    FluxControlPipeline,
    FluxPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanVACEPipeline,
)

from poegen.expert_servers.flow import FluxAdapter, SD3Adapter, WanAdapter
from poegen.expert_servers.flow.wan import _to_pil
from poegen.expert_servers.server import Condition, ModelRef
from poegen.kernel.experts import Capability, check_expert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings

ADAPTERS = {"flux": FluxAdapter, "flux_depth": FluxAdapter, "sd3": SD3Adapter, "wan": WanAdapter,
            "wan_i2v": WanAdapter, "wan_vace": WanAdapter}  # fmt: skip
STEPS, SEED = 3, 11


def _expert(flow_models: Any, name: str, **options: str) -> Any:
    ref = ModelRef(name, flow_models.path(name))
    options = {"max_sequence_length": "16", **options}
    return ADAPTERS[name]().load(ref, options, lambda f, m: None).expert


def _one_particle(view: Any, shape: tuple[int, ...]) -> torch.Tensor:
    settings = SamplerSettings(
        num_particles=1, mcmc_steps=0, transition="euler", num_steps=STEPS, schedule="expert"
    )
    result = sample([Factor(view)], shape, settings, generator=torch.Generator().manual_seed(SEED))
    return result.particles


def _noise(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(SEED))


def test_describe_and_latent_layout(flow_models):
    flux, wan = _expert(flow_models, "flux"), _expert(flow_models, "wan")
    info = check_expert(flux)
    assert info.latent_space == "flux-vae-16" and info.model_id == "flux"
    assert info.supports(Capability.SCHEDULE) and info.supports(Capability.AUTOENCODER)
    layout = flux.describe().latent_layout
    assert (layout.channels, layout.packing, layout.multiple) == (16, "2x2", 2)
    assert set(layout.dynamic_shift) == {
        "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"
    }  # fmt: skip
    wan_layout = wan.describe().latent_layout
    assert wan.describe().latent_space == "wan-vae-16"
    assert (wan_layout.temporal_compression, wan_layout.shift, wan_layout.dynamic_shift) == (
        4,
        7.0,
        {},
    )
    assert (
        _expert(flow_models, "sd3", latent_space="sd3-custom").describe().latent_space
        == "sd3-custom"
    )


def test_flux_schedule_shifts_with_resolution(flow_models):
    flux = _expert(flow_models, "flux")
    small, large = flux.schedule(4, (16, 8, 8)), flux.schedule(4, (16, 128, 128))
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert all(
        b > a for a, b in zip(small[1:-1], large[1:-1], strict=True)
    )  # more tokens, more shift


@pytest.mark.parametrize(("name", "pixels"), [("flux", (1, 3, 16, 16)), ("sd3", (2, 3, 16, 16)),
                                             ("wan", (1, 3, 5, 32, 32))])  # fmt: skip
def test_encode_decode_through_the_vae(flow_models, name, pixels):
    expert = _expert(flow_models, name)
    x = torch.rand(pixels, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = expert.encode(x)
    layout = expert.describe().latent_layout
    assert z.shape[:2] == (pixels[0], layout.channels)
    assert z.shape[-1] == pixels[-1] // layout.spatial_compression
    back = expert.decode(z)
    assert back.shape == x.shape and back.min() >= -1 and back.max() <= 1
    if name == "flux":
        vae = expert.pipe.vae
        raw = vae.encode(x).latent_dist.mode()
        want = (raw - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(z, want)


def test_flux_depth_control_equals_the_control_pipeline(flow_models):
    expert = _expert(flow_models, "flux_depth")
    depth = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    view = expert.prepare(Condition(text="a chair", tensors={"depth": depth}))
    shape = (16, 8, 8)
    got = _one_particle(view, shape)
    # the control latents the expert encoded, handed to the pipeline already packed (it skips
    # its own VAE sampling for a 3-D control tensor)
    control, grid = view.control
    pixels = (2 * depth - 1).expand(1, 3, 16, 16)
    z = expert.encode(pixels)
    torch.testing.assert_close(control, FluxPipeline._pack_latents(z, 1, 16, *grid))
    pipe = FluxControlPipeline.from_pretrained(flow_models.path("flux_depth"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a chair", control_image=control, latents=FluxPipeline._pack_latents(_noise(shape), 1, *shape),
        num_inference_steps=STEPS, guidance_scale=3.5, height=16, width=16, output_type="latent",
        max_sequence_length=16,
    ).images  # fmt: skip
    want = FluxPipeline._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    assert (got - want).abs().max() <= 1e-5
    other = expert.prepare(Condition(text="a chair", tensors={"depth": 1 - depth}))
    x, sigma = _noise(shape), torch.tensor([0.7])
    assert not torch.allclose(view.velocity(x, sigma), other.velocity(x, sigma))


def test_flux_true_cfg_with_a_negative_prompt_equals_the_pipeline(flow_models):
    expert = _expert(flow_models, "flux")
    condition = Condition(
        text="a cat", negative_text="blurry",
        scalars={"true_cfg_scale": 2.5, "guidance_scale": 3.0},
    )  # fmt: skip
    shape = (16, 8, 8)
    view = expert.prepare(condition)
    got = _one_particle(view, shape)
    out = expert.pipe(
        "a cat", negative_prompt="blurry", true_cfg_scale=2.5, guidance_scale=3.0,
        latents=FluxPipeline._pack_latents(_noise(shape), 1, *shape), num_inference_steps=STEPS,
        height=16, width=16, output_type="latent", max_sequence_length=16,
    ).images  # fmt: skip
    want = FluxPipeline._unpack_latents(out, 16, 16, expert.pipe.vae_scale_factor)
    assert (got - want).abs().max() <= 1e-5
    plain = _one_particle(
        expert.prepare(Condition(text="a cat", scalars={"guidance_scale": 3.0})), shape
    )
    assert not torch.allclose(got, plain)


def test_wan_image_to_video_equals_the_pipeline(flow_models):
    expert = _expert(flow_models, "wan_i2v")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    condition = Condition(
        text="a ball rolling", tensors={"image": image}, negative_text="static",
        scalars={"num_frames": 5.0, "guidance_scale": 5.0},
    )  # fmt: skip
    shape = (16, 2, 4, 4)
    got = _one_particle(expert.prepare(condition), shape)
    pipe = WanImageToVideoPipeline.from_pretrained(flow_models.path("wan_i2v"))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        image=_to_pil(image), prompt="a ball rolling", negative_prompt="static", height=32,
        width=32, num_frames=5, latents=_noise(shape), num_inference_steps=STEPS,
        guidance_scale=5.0, output_type="latent", max_sequence_length=16,
    ).frames  # fmt: skip
    assert (got - want).abs().max() <= 1e-5


def test_wan_vace_depth_video_equals_the_pipeline(flow_models):
    expert = _expert(flow_models, "wan_vace")
    g = torch.Generator().manual_seed(4)
    # (F, 1, H, W) in [0, 1], a renderer's layout; 8-bit levels, as the pipeline's frames are
    depth = torch.round(torch.rand(5, 1, 32, 32, generator=g) * 255) / 255
    mask = (torch.rand(5, 1, 32, 32, generator=g) > 0.3).float()
    condition = Condition(
        text="a ball rolling", tensors={"depth": depth, "mask": mask},
        scalars={"guidance_scale": 5.0, "conditioning_scale": 0.8},
    )  # fmt: skip
    shape = (16, 2, 4, 4)
    got = _one_particle(expert.prepare(condition), shape)
    pipe = WanVACEPipeline.from_pretrained(flow_models.path("wan_vace"))
    pipe.set_progress_bar_config(disable=True)
    # the same frames as the pipeline's inputs: (2d − 1) and the mask as 3-channel videos
    video = [_to_pil((2 * d - 1).expand(3, -1, -1)) for d in depth]
    masks = [_to_pil((2 * m - 1).expand(3, -1, -1)) for m in mask]
    want = pipe(
        video=video, mask=masks, prompt="a ball rolling", height=32, width=32, num_frames=5,
        latents=_noise(shape), num_inference_steps=STEPS, guidance_scale=5.0,
        conditioning_scale=0.8, output_type="latent", max_sequence_length=16,
    ).frames  # fmt: skip
    assert (got - want).abs().max() <= 1e-5


def test_prompts_are_encoded_once_per_condition(flow_models):
    expert = _expert(flow_models, "sd3")
    encoders = [expert.pipe.text_encoder, expert.pipe.text_encoder_2, expert.pipe.text_encoder_3]
    calls = [0]

    def count(module: Any, args: Any, output: Any) -> None:
        calls[0] += 1

    hooks = [encoder.register_forward_hook(count) for encoder in encoders]
    try:
        view = expert.prepare(Condition(text="a cube", negative_text="x"))
        prepared = calls[0]
        _one_particle(view, (4, 8, 8))
    finally:
        for hook in hooks:
            hook.remove()
    assert prepared == 2 * len(encoders)  # prompt and negative prompt, once each
    assert calls[0] == prepared  # no encoder call while sampling


def test_box_crops_the_model_input_and_zeroes_outside(flow_models):
    expert = _expert(flow_models, "flux")
    box = torch.tensor([2, 4, 4, 4])
    boxed = expert.prepare(Condition(text="a cat", tensors={"box": box}))
    whole = expert.prepare(Condition(text="a cat"))
    x, sigma = (
        torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)),
        torch.tensor([0.9, 0.3]),
    )
    v = boxed.velocity(x, sigma)
    inside = (..., slice(2, 6), slice(4, 8))
    torch.testing.assert_close(v[inside], whole.velocity(x[inside].contiguous(), sigma))
    mask = torch.zeros_like(v, dtype=torch.bool)
    mask[inside] = True
    assert (v[~mask] == 0).all()


def test_expert_velocity_is_the_models_on_the_empty_prompt(flow_models):
    """The expert's own velocity (no condition) is Wan's transformer on the empty prompt (CFG
    against the empty negative prompt leaves it as is): checked against a pipeline loaded
    here, its transformer called directly with the pipeline's prompt embeddings, and its loop."""
    expert = _expert(flow_models, "wan")
    x, sigma = (
        torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5)),
        torch.tensor([0.8, 0.2]),
    )
    got = expert.velocity(x, sigma)
    pipe = WanPipeline.from_pretrained(flow_models.path("wan"))
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(
        ["", ""], do_classifier_free_guidance=False, max_sequence_length=16
    )
    t = sigma * pipe.scheduler.config.num_train_timesteps
    with torch.no_grad():
        want = pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False
        )[0]
    torch.testing.assert_close(got, want)
    # the pipeline's loop, one Euler step from σ = 1 to 0: latents − v(latents, 1)
    out = pipe(
        ["", ""], height=32, width=32, num_frames=9, latents=x, num_inference_steps=1,
        guidance_scale=5.0, output_type="latent", max_sequence_length=16,
    ).frames  # fmt: skip
    assert pipe.scheduler.sigmas[0] == 1.0
    torch.testing.assert_close(expert.velocity(x, torch.ones(2)), x - out, rtol=0, atol=1e-5)


def test_wan_folder_with_a_unipc_scheduler_gets_the_flow_match_grid(flow_models, tmp_path):
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    folder = shutil.copytree(flow_models.path("wan"), tmp_path / "wan_unipc")
    shutil.rmtree(folder / "scheduler")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]  # as real Wan 2.1 folders
    (folder / "model_index.json").write_text(json.dumps(index))
    expert = WanAdapter().load(ModelRef("wan_unipc", folder), {}, lambda f, m: None).expert
    want = FlowMatchEulerDiscreteScheduler(shift=3.0)
    want.set_timesteps(5)
    assert expert.schedule(5, (16, 3, 4, 4)) == [float(s) for s in want.sigmas]


def test_bfloat16_option_runs_the_transformer_in_bfloat16(flow_models):
    expert = _expert(flow_models, "flux", torch_dtype="bfloat16")
    assert expert.pipe.transformer.dtype == torch.bfloat16
    view = expert.prepare(Condition(text="a cat"))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    v = view.velocity(x, torch.tensor([0.6]))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    full = (
        _expert(flow_models, "flux")
        .prepare(Condition(text="a cat"))
        .velocity(x, torch.tensor([0.6]))
    )
    assert (v - full).abs().max() < 0.1 * full.abs().max()  # bf16 rounding, same model
