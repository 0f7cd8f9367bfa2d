"""``WanAdapter``: Wan 2.1 text-to-video, image-to-video and VACE control as generative experts.

Folders: a ``WanPipeline`` (text-to-video), ``WanImageToVideoPipeline`` (Wan 2.1 style, with
a CLIP image encoder) or ``WanVACEPipeline`` (control video) folder; Wan 2.2 folders (two
transformers, expanded timesteps) are refused. The expert works on video latents
``(B, 16, F, H, W)``: F latent frames for 4·(F − 1) + 1 pixel frames (the VAE's temporal
compression), H and W multiples of the transformer's patch (2).

Conditions: ``text`` (through UMT5 with the pipeline's ``encode_prompt``), the negative prompt
(``negative_text``; default: option ``negative_prompt``), scalar
``guidance_scale`` (CFG; default: option ``guidance_scale``, else 5.0; ≤ 1 turns it off), for
text-to-video tensor ``box`` (the crop of every frame the transformer sees). As
the pipeline's loop, two transformer calls per velocity (conditional, then unconditional)::

    v = v_u + g·(v_c − v_u),   v_c = transformer(x, t = σ·1000, pos),  v_u = … neg

Image-to-video (an I2V folder) also needs tensor ``image`` (the first frame, pixels in
[-1, 1], ``(3, H, W)``) and scalar ``num_frames`` (pixel frames, 4k + 1). ``Prepare`` runs the
pipeline's ``encode_image`` (CLIP) and ``prepare_latents`` once: the VAE latents of the first
frame followed by zeros, with the frame mask, concatenated with x along channels at each call.

Control video (a ``WanVACEPipeline`` folder): tensor ``control_video`` (F, 3, H, W) in [-1, 1]
or ``depth`` (F, 1, H, W) in [0, 1] (a renderer's layout, mapped to 2·d − 1), optional ``mask``
(F, 1, H, W) in [0, 1] (1: generate, 0: keep the control video; default all ones) and scalar
``conditioning_scale`` (default 1). ``Prepare`` runs the pipeline's ``prepare_video_latents``
and ``prepare_masks`` once (no reference images); each call passes them as the VACE
transformer's ``control_hidden_states``.

``Schedule``: the scheduler's ``set_timesteps(N)`` (static ``shift``; for a UniPC folder,
``flow_shift`` on a FlowMatchEulerDiscreteScheduler). Encode/Decode: the Wan VAE with the
per-channel ``latents_mean``/``latents_std`` normalisation; videos ``(B, 3, 4k + 1, H, W)``.
Options: the common ones, ``guidance_scale``, ``negative_prompt``, ``max_sequence_length``
(default 512).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanVACEPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
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

PIPELINES: dict[str, Any] = {
    "WanPipeline": WanPipeline,
    "WanImageToVideoPipeline": WanImageToVideoPipeline,
    "WanVACEPipeline": WanVACEPipeline,
}
OPTIONS = ("guidance_scale", "negative_prompt", "max_sequence_length")


class WanAdapter:
    """Loads Wan folders (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        opts = parse_options(options, OPTIONS)
        opts.number("guidance_scale", 5.0)
        opts.integer("max_sequence_length", 512)
        folder = model_folder(ref)
        name = pipeline_class_name(folder, ref, PIPELINES, "Wan")
        progress(0.1, f"loading {name}")
        pipe = load_pipeline(PIPELINES[name], folder, ref, opts)
        if getattr(pipe, "transformer", None) is None or getattr(
            pipe.config, "expand_timesteps", False
        ):
            raise ExpertError.invalid(
                "model_id", f"{ref.model_id!r}: only single-transformer Wan 2.1 folders are served"
            )
        expert = WanExpert(pipe, opts, model_id=ref.model_id, revision=model_revision(folder))
        return ServedModel(
            expert,
            latent_space=expert.describe().latent_space,
            max_batch=opts.max_batch,
            concurrent=False,  # a diffusers pipeline: one call at a time
        )


def _first_frame(condition: Condition) -> Tensor:
    field = "condition.tensors[image]"
    image = condition.tensors.get("image")
    if image is None:
        raise ExpertError.invalid(field, "an image-to-video model needs the first frame")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ExpertError.invalid(field, f"shape {list(image.shape)}, expected float (3, H, W)")
    if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
        raise ExpertError.invalid(field, "pixels must lie in [-1, 1]")
    return image


def _video_tensor(condition: Condition, name: str, low: float) -> Tensor | None:
    """A per-frame video tensor ``(F, C, H, W)`` (or ``(F, H, W)``) with values in [low, 1]."""
    t = condition.tensors.get(name)
    if t is None:
        return None
    field = f"condition.tensors[{name}]"
    if t.ndim == 3:  # (F, H, W)
        t = t.unsqueeze(1)
    if t.ndim != 4 or not t.is_floating_point():
        raise ExpertError.invalid(f"{field}.shape", f"{list(t.shape)}, expected float (F, C, H, W)")
    if not torch.isfinite(t).all() or t.min() < low or t.max() > 1:
        raise ExpertError.invalid(field, f"values must lie in [{low:g}, 1]")
    return t.float()


def _control_video(condition: Condition) -> Tensor:
    """The VACE control video (1, 3, F, H, W) in [-1, 1]: ``control_video`` (F, 3, H, W) in
    [-1, 1], or ``depth`` (F, 1, H, W) in [0, 1] (as a renderer gives it), mapped to 2·d − 1."""
    video = _video_tensor(condition, "control_video", -1.0)
    if video is None:
        depth = _video_tensor(condition, "depth", 0.0)
        if depth is None:
            raise ExpertError.invalid(
                "condition.tensors[control_video]", "a VACE model needs a control_video or depth"
            )
        video = 2 * depth - 1
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    if video.shape[1] != 3:
        raise ExpertError.invalid(
            "condition.tensors[control_video].shape", f"{video.shape[1]} channels, expected 1 or 3"
        )
    return video.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def _control_mask(condition: Condition, shape: torch.Size) -> Tensor:
    """Where VACE generates (1) or keeps the control video (0): ``mask`` (F, 1, H, W) in
    [0, 1]; all ones when absent. Shape ``shape`` (1, 3, F, H, W)."""
    mask = _video_tensor(condition, "mask", 0.0)
    if mask is None:
        return torch.ones(shape)
    mask = mask[:, :1].permute(1, 0, 2, 3).unsqueeze(0)
    if mask.shape[2:] != shape[2:]:
        raise ExpertError.invalid(
            "condition.tensors[mask].shape",
            f"{list(mask.shape[2:])} (F, H, W) differs from the control video's {list(shape[2:])}",
        )
    return mask.expand(shape).contiguous()


def _to_pil(image: Tensor) -> PIL.Image.Image:
    """(3, H, W) in [-1, 1] → an RGB image, as a user would hand the pipeline."""
    array = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy()))


class WanExpert(FamilyExpert):
    """A Wan 2.1 transformer behind poegen's generative-expert protocol."""

    family = "wan"
    sample_ndim = 5

    def __init__(self, pipe: Any, opts: Any, **kw: Any) -> None:
        self.image_to_video = isinstance(pipe, WanImageToVideoPipeline)
        self.vace = isinstance(pipe, WanVACEPipeline)
        super().__init__(pipe, opts, **kw)
        self.guidance_scale = opts.number("guidance_scale", 5.0)
        self.negative_prompt = opts.get("negative_prompt", "")
        self.max_sequence_length = opts.integer("max_sequence_length", 512)

    def _layout(self) -> LatentLayout:
        shift, dynamic = scheduler_layout(self.fresh_scheduler().config)
        return LatentLayout(
            channels=int(self.pipe.vae.config.z_dim),
            packing="none",
            spatial_compression=int(self.pipe.vae_scale_factor_spatial),
            temporal_compression=int(self.pipe.vae_scale_factor_temporal),
            multiple=int(self.pipe.transformer.config.patch_size[1]),
            shift=shift,
            dynamic_shift=dynamic,
        )

    @torch.no_grad()
    def prepare(self, condition: Condition) -> WanView:
        """Encode prompt and negative prompt once (UMT5); the first frame for I2V; the control
        video for VACE."""
        tensors: tuple[str, ...] = ("box",)
        scalars: tuple[str, ...] = ("guidance_scale",)
        if self.image_to_video:
            tensors, scalars = ("image",), ("guidance_scale", "num_frames")
        elif self.vace:
            tensors = ("control_video", "depth", "mask")
            scalars = ("guidance_scale", "conditioning_scale")
        check_keys(condition, tensors, scalars)
        box = read_box(condition, self.layout.multiple)
        guidance = condition_scalar(condition, "guidance_scale", self.guidance_scale)
        negative = condition.negative_text or self.negative_prompt
        cfg = guidance > 1
        dtype = self.transformer_dtype
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=condition.text,
            negative_prompt=negative,
            do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        image = self._image_condition(condition) if self.image_to_video else None
        control = self._control_condition(condition) if self.vace else None
        return WanView(
            self, embeds.to(dtype), None if not cfg else neg_embeds.to(dtype),
            guidance if cfg else None, image, box, control,
        )  # fmt: skip

    def _image_condition(self, condition: Condition) -> tuple[Tensor, Tensor | None]:
        """(mask ‖ first-frame latents (1, 4 + 16, F, H, W), CLIP image embeddings)."""
        pipe = self.pipe
        frame = _first_frame(condition)
        frames = condition_scalar(condition, "num_frames", 0.0)
        k = self.layout.temporal_compression
        if frames != int(frames) or frames < 1 or (int(frames) - 1) % k:
            raise ExpertError.invalid(
                "condition.scalars[num_frames]", f"{frames:g}, expected {k}·n + 1 pixel frames"
            )
        s = self.layout.spatial_compression * self.layout.multiple
        check_multiple(frame.unsqueeze(0), "condition.tensors[image]", (2, 3), s)
        height, width = frame.shape[1:]
        pil = _to_pil(frame)
        embeds = None
        if pipe.image_encoder is not None:
            embeds = pipe.encode_image(pil, self.device).to(self.transformer_dtype)
        pixels = pipe.video_processor.preprocess(pil, height=height, width=width)
        shape = (1, self.layout.channels, (int(frames) - 1) // k + 1,
                 height // self.layout.spatial_compression, width // self.layout.spatial_compression)  # fmt: skip
        _, latents_condition = pipe.prepare_latents(
            pixels.to(self.device, torch.float32), 1, self.layout.channels, height, width,
            int(frames), torch.float32, self.device, None, torch.zeros(shape),
        )  # fmt: skip
        return latents_condition, embeds

    def _control_condition(self, condition: Condition) -> tuple[Tensor, Tensor]:
        """VACE: (conditioning latents (1, 96, F, H, W), per-layer scale), as the pipeline
        builds them from a control video, its mask and no reference image."""
        pipe = self.pipe
        video = _control_video(condition)
        frames = video.shape[2]
        k, s = self.layout.temporal_compression, self.layout.spatial_compression
        if (frames - 1) % k:
            raise ExpertError.invalid(
                "condition.tensors[control_video].shape", f"{frames} frames, expected {k}·n + 1"
            )
        check_multiple(video, "condition.tensors[control_video]", (3, 4), s * self.layout.multiple)
        mask = _control_mask(condition, video.shape)
        video, mask = video.to(self.device), mask.to(self.device)
        latents = pipe.prepare_video_latents(video, mask, [[]], None, self.device)
        latents = torch.cat([latents, pipe.prepare_masks(mask, [[]], None)], dim=1)
        scale = condition_scalar(condition, "conditioning_scale", 1.0)
        layers = len(pipe.transformer.config.vace_layers)
        scales = torch.full((layers,), scale, device=self.device, dtype=self.transformer_dtype)
        return latents.to(self.transformer_dtype), scales

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        """The scheduler's grid for N steps (Wan: a static shift)."""
        check_steps(num_steps)
        if len(sample_shape) != 4:
            raise ExpertError.invalid(
                "sample_shape", f"{list(sample_shape)}, expected [C, F, H, W]"
            )
        scheduler = self.fresh_scheduler()
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler_sigmas(scheduler)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Normalised latents (B, 16, F, H/8, W/8) of a video (B, 3, 4k + 1, H, W) in [-1, 1]."""
        vae = self.pipe.vae
        check_pixels(pixels, "pixels", 3, 5)
        z = retrieve_latents(vae.encode(pixels.to(vae.device, vae.dtype)), sample_mode="argmax")
        mean, std = self._stats(z)
        return ((z - mean) / std).to(pixels.device, pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """A video (B, 3, 4(F − 1) + 1, H·8, W·8) in [-1, 1]."""
        vae = self.pipe.vae
        check_pixels(latents, "latents", self.layout.channels, 5)
        z = latents.to(vae.device, vae.dtype)
        mean, std = self._stats(z)
        video = vae.decode(z * std + mean, return_dict=False)[0]
        return video.clamp(-1, 1).to(latents.device, latents.dtype)


class WanView(FamilyView):
    """One prepared Wan condition: embeddings, CFG scale, the I2V image condition."""

    def __init__(
        self,
        expert: WanExpert,
        embeds: Tensor,
        neg_embeds: Tensor | None,
        guidance: float | None,
        image: tuple[Tensor, Tensor | None] | None,
        box: tuple[int, int, int, int] | None = None,
        control: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(expert, box)
        self.embeds, self.neg_embeds, self.guidance = embeds, neg_embeds, guidance
        self.image = image
        self.control = control

    def _velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        expert: WanExpert = self.expert  # type: ignore[assignment]
        transformer = expert.pipe.transformer
        check_batch(x, sigma, expert.layout.channels, 5)
        check_multiple(x, "x", (3, 4), expert.layout.multiple)
        b = x.shape[0]
        dtype, device = expert.transformer_dtype, expert.device
        latents = x.to(device, torch.float32)
        extra: dict[str, Any] = {}
        if self.image is not None:
            condition, image_embeds = self.image
            if condition.shape[2:] != x.shape[2:]:
                raise ExpertError.invalid(
                    "x.shape",
                    f"latent grid {list(x.shape[2:])} does not match the prepared image's "
                    f"{list(condition.shape[2:])} (num_frames, image size)",
                )
            latents = torch.cat([latents, condition.expand(b, -1, -1, -1, -1)], dim=1)
            if image_embeds is not None:
                extra["encoder_hidden_states_image"] = image_embeds.expand(b, -1, -1)
        if self.control is not None:
            control, scales = self.control
            if control.shape[2:] != x.shape[2:]:
                raise ExpertError.invalid(
                    "x.shape",
                    f"latent grid {list(x.shape[2:])} does not match the control video's "
                    f"{list(control.shape[2:])}",
                )
            extra["control_hidden_states"] = control.expand(b, -1, -1, -1, -1)
            extra["control_hidden_states_scale"] = scales
        hidden = latents.to(dtype)
        t = timesteps(
            sigma.to(device), expert.pipe.scheduler.config.num_train_timesteps, torch.float32
        )

        def run(embeds: Tensor) -> Tensor:
            return transformer(
                hidden_states=hidden, timestep=t, encoder_hidden_states=embeds.expand(b, -1, -1),
                return_dict=False, **extra,
            )[0]  # fmt: skip

        v = run(self.embeds)
        if self.guidance is not None and self.neg_embeds is not None:
            v_uncond = run(self.neg_embeds)
            v = v_uncond + self.guidance * (v - v_uncond)
        return v.to(x.device, x.dtype)
