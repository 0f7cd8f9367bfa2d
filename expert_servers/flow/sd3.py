"""``SD3Adapter``: Stable Diffusion 3 / 3.5 text-to-image as a generative expert.

Folders: a ``StableDiffusion3Pipeline`` folder. The expert works on latents ``(B, C, H, W)``
(C the transformer's ``in_channels``, 16 for SD3; H, W multiples of its ``patch_size``).

Conditions: ``text`` (the prompt, through both CLIPs and T5 with the pipeline's
``encode_prompt``), the negative prompt (``negative_text``; default: option
``negative_prompt``, else empty), scalar ``guidance_scale`` (classifier-free guidance;
default: option ``guidance_scale``, else 7.0; ≤ 1 turns CFG off), tensor ``box`` (the crop
the transformer sees, see :class:`~.family.FamilyView`). Velocity, as the pipeline's
loop computes it, with one batched call over [negative; positive]::

    v_u, v_c = transformer([x; x], t = σ·1000, [neg; pos]).chunk(2)
    v = v_u + g·(v_c − v_u)

``Schedule``: the scheduler's own ``set_timesteps(N)`` (static shift, 3.0 for SD3), with
``mu = calculate_shift(...)`` when the folder's scheduler uses dynamic shifting (SD3.5).
Encode/Decode: z = (mode(VAE(pixels)) − shift_factor)·scaling_factor, and back, clamped.
Options: the common ones, ``guidance_scale``, ``negative_prompt``, ``max_sequence_length``
(default 256).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from torch import Tensor

from poegen.expert_servers.flow.common import (
    check_batch,
    check_keys,
    check_multiple,
    check_pixels,
    check_steps,
    condition_scalar,
    load_pipeline,
    model_folder,
    model_revision,
    parse_options,
    pipeline_class_name,
    scheduler_sigmas,
    timesteps,
)
from poegen.expert_servers.flow.family import (
    FamilyExpert,
    FamilyView,
    LatentLayout,
    read_box,
    scheduler_layout,
)
from poegen.expert_servers.server.adapter import Condition, ModelRef, Progress, ServedModel
from poegen.kernel.refusal import ExpertError

PIPELINES = {"StableDiffusion3Pipeline": StableDiffusion3Pipeline}
OPTIONS = ("guidance_scale", "negative_prompt", "max_sequence_length")


class SD3Adapter:
    """Loads SD3 folders (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        opts = parse_options(options, OPTIONS)
        opts.number("guidance_scale", 7.0)
        opts.integer("max_sequence_length", 256)
        folder = model_folder(ref)
        name = pipeline_class_name(folder, ref, PIPELINES, "SD3")
        progress(0.1, f"loading {name}")
        pipe = load_pipeline(PIPELINES[name], folder, ref, opts)
        expert = SD3Expert(pipe, opts, model_id=ref.model_id, revision=model_revision(folder))
        return ServedModel(
            expert,
            latent_space=expert.describe().latent_space,
            max_batch=opts.max_batch,
            concurrent=False,  # a diffusers pipeline: one call at a time
        )


class SD3Expert(FamilyExpert):
    """An SD3 transformer behind poegen's generative-expert protocol."""

    family = "sd3"

    def __init__(self, pipe: Any, opts: Any, **kw: Any) -> None:
        super().__init__(pipe, opts, **kw)
        self.guidance_scale = opts.number("guidance_scale", 7.0)
        self.negative_prompt = opts.get("negative_prompt", "")
        self.max_sequence_length = opts.integer("max_sequence_length", 256)

    def _layout(self) -> LatentLayout:
        shift, dynamic = scheduler_layout(self.pipe.scheduler.config)
        return LatentLayout(
            channels=int(self.pipe.transformer.config.in_channels),
            packing="none",
            spatial_compression=int(self.pipe.vae_scale_factor),
            temporal_compression=1,
            multiple=int(self.pipe.transformer.config.patch_size),
            shift=shift,
            dynamic_shift=dynamic,
        )

    @torch.no_grad()
    def prepare(self, condition: Condition) -> SD3View:
        """Encode prompt and negative prompt once (CLIP-L, CLIP-G, T5)."""
        check_keys(condition, ("box",), ("guidance_scale",))
        box = read_box(condition, self.layout.multiple)
        guidance = condition_scalar(condition, "guidance_scale", self.guidance_scale)
        negative = condition.negative_text or self.negative_prompt
        cfg = guidance > 1
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=condition.text,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative,
            do_classifier_free_guidance=cfg,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        if cfg:  # the pipeline's order: [negative; positive]
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
        return SD3View(self, embeds, pooled, guidance if cfg else None, box)

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        """The scheduler's grid for N steps (dynamic shift from the token count if enabled)."""
        check_steps(num_steps)
        if len(sample_shape) != 3:
            raise ExpertError.invalid("sample_shape", f"{list(sample_shape)}, expected [C, H, W]")
        scheduler = self.fresh_scheduler()
        config = scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            patch = self.layout.multiple
            kwargs["mu"] = calculate_shift(
                (sample_shape[1] // patch) * (sample_shape[2] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
        return scheduler_sigmas(scheduler)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        vae = self.pipe.vae
        check_pixels(pixels, "pixels", int(vae.config.in_channels), 4)
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        return z.to(pixels.device, pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        check_pixels(latents, "latents", self.layout.channels, 4)
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        z = z + (vae.config.shift_factor or 0.0)
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1).to(latents.device, latents.dtype)


class SD3View(FamilyView):
    """One prepared SD3 condition: [neg; pos] embeddings and the CFG scale (None: off)."""

    def __init__(
        self,
        expert: SD3Expert,
        embeds: Tensor,
        pooled: Tensor,
        guidance: float | None,
        box: tuple[int, int, int, int] | None = None,
    ) -> None:
        super().__init__(expert, box)
        self.embeds, self.pooled, self.guidance = embeds, pooled, guidance

    def _velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        expert: SD3Expert = self.expert  # type: ignore[assignment]
        transformer = expert.pipe.transformer
        check_batch(x, sigma, expert.layout.channels, 4)
        check_multiple(x, "x", (2, 3), expert.layout.multiple)
        b = x.shape[0]
        dtype, device = expert.transformer_dtype, expert.device
        copies = 2 if self.guidance is not None else 1
        latents = torch.cat([x.to(device, dtype)] * copies)
        t = timesteps(sigma.to(device), expert.pipe.scheduler.config.num_train_timesteps, dtype)
        embeds = self.embeds.repeat_interleave(b, dim=0)
        pooled = self.pooled.repeat_interleave(b, dim=0)
        v = transformer(
            hidden_states=latents,
            timestep=torch.cat([t] * copies),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if self.guidance is not None:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + self.guidance * (v_text - v_uncond)
        return v.to(x.device, x.dtype)
