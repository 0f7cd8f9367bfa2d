"""``FluxAdapter``: FLUX.1 text-to-image and FLUX depth/canny control as generative experts.

Folders: a ``FluxPipeline`` or ``FluxControlPipeline`` folder (``model_index.json``). The
expert works on *unpacked* latents ``(B, 16, H, W)`` (H, W even; pixels = latents × the VAE's
``vae_scale_factor``); packing into 2×2 tokens, the image ids, the timestep scaling and
unpacking happen inside :meth:`FluxView.velocity` with the pipeline's own helpers::

    packed = FluxPipeline._pack_latents(x, B, 16, H, W)                     # (B, H/2·W/2, 64)
    v = transformer(packed [‖ control], timestep=t/1000, guidance=g, ...)    # t = σ·1000
    velocity = FluxPipeline._unpack_latents(v, H·s, W·s, s)                  # (B, 16, H, W)

Conditions (``Prepare``): ``text`` (the prompt, through CLIP and T5 with the pipeline's
``encode_prompt``); scalar ``guidance_scale`` (the guidance embedding; default: option
``guidance_scale``, else 3.5); scalar ``true_cfg_scale`` with ``negative_text`` (defaults: options
``true_cfg_scale`` and ``negative_prompt``): FLUX's "true CFG", a second transformer call with
the negative prompt, v = v_neg + s·(v − v_neg), when s > 1 and the negative prompt is not
empty (the pipeline's rule); for a control folder, the control image as tensor
``control_image`` (pixels in [-1, 1], ``(C, H, W)`` or ``(1, C, H, W)``, C = 1 or 3) or
``depth`` (a depth map in [0, 1], same shapes; mapped to 2·d − 1): it is VAE-encoded once (the
posterior's mode, so the expert stays deterministic), packed and concatenated with the latent
tokens along channels, as ``FluxControlPipeline`` does. Its grid must match x's. A
text-to-image condition may carry tensor ``box`` (``[top, left, height, width]`` in latent
cells, even): the transformer then sees only that crop (:class:`~.family.FamilyView`).

``Schedule``: the pipeline's grid ``linspace(1, 1/N, N)`` shifted by the scheduler with
``mu = calculate_shift(H/2 · W/2, ...)`` (FLUX's dynamic shifting), via ``retrieve_timesteps``.

Encode/Decode: z = (mode(VAE(pixels)) − shift_factor)·scaling_factor; decode inverts and clamps
to [-1, 1]. Options: the common ones plus ``guidance_scale``, ``true_cfg_scale``,
``negative_prompt`` and ``max_sequence_length`` (default 512).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxControlPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
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

PIPELINES = {"FluxPipeline": FluxPipeline, "FluxControlPipeline": FluxControlPipeline}
OPTIONS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "max_sequence_length")


class FluxAdapter:
    """Loads FLUX folders (see the module docstring); subclasses serve other FLUX pipelines."""

    pipelines: ClassVar[Mapping[str, type]] = PIPELINES
    options: ClassVar[tuple[str, ...]] = OPTIONS
    family: ClassVar[str] = "FLUX"

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        opts = parse_options(options, self.options)
        opts.number("guidance_scale", 3.5)
        opts.integer("max_sequence_length", 512)
        folder = model_folder(ref)
        name = pipeline_class_name(folder, ref, self.pipelines, self.family)
        progress(0.1, f"loading {name}")
        pipe = load_pipeline(self.pipelines[name], folder, ref, opts)
        expert = self.expert(pipe, opts, model_id=ref.model_id, revision=model_revision(folder))
        return ServedModel(
            expert,
            latent_space=expert.describe().latent_space,
            max_batch=opts.max_batch,
            concurrent=False,  # a diffusers pipeline: one call at a time
        )

    def expert(self, pipe: Any, opts: Any, **kw: Any) -> FluxExpert:
        """The expert over a loaded pipeline (``FamilyExpert``'s keyword arguments)."""
        return FluxExpert(pipe, opts, **kw)


def condition_pixels(t: Tensor, field: str, channels: tuple[int, ...], low: float) -> Tensor:
    """A condition image ``(C, H, W)`` or ``(1, C, H, W)``, finite, in [low, 1]: (1, C, H, W)."""
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[0] != 1 or t.shape[1] not in channels:
        allowed = " or ".join(str(c) for c in channels)
        raise ExpertError.invalid(field, f"shape {list(t.shape)}, expected (C, H, W), C {allowed}")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise ExpertError.invalid(field, "expected finite floating-point pixels")
    if t.min() < low or t.max() > 1:
        raise ExpertError.invalid(field, f"values must lie in [{low:g}, 1]")
    return t


def _control_pixels(condition: Condition) -> Tensor | None:
    """The control image in [-1, 1], ``(1, 3, H, W)``, from ``control_image`` or ``depth``."""
    for name, to_signed in (("control_image", False), ("depth", True)):
        t = condition.tensors.get(name)
        if t is None:
            continue
        low = 0.0 if to_signed else -1.0
        t = condition_pixels(t, f"condition.tensors[{name}]", (1, 3), low)
        t = 2 * t - 1 if to_signed else t
        return t.expand(1, 3, *t.shape[2:]) if t.shape[1] == 1 else t
    return None


class FluxExpert(FamilyExpert):
    """A FLUX transformer behind poegen's generative-expert protocol."""

    family = "flux"
    default_guidance = 3.5  # FluxPipeline's default

    def __init__(self, pipe: Any, opts: Any, **kw: Any) -> None:
        self.control = isinstance(pipe, FluxControlPipeline)
        super().__init__(pipe, opts, **kw)
        self.guidance_scale = opts.number("guidance_scale", self.default_guidance)
        self.true_cfg_scale = opts.number("true_cfg_scale", 1.0)
        self.negative_prompt = opts.get("negative_prompt", "")
        self.max_sequence_length = opts.integer("max_sequence_length", 512)

    def _layout(self) -> LatentLayout:
        shift, dynamic = scheduler_layout(self.pipe.scheduler.config)
        return LatentLayout(
            channels=int(self.pipe.vae.config.latent_channels),
            packing="2x2",
            spatial_compression=int(self.pipe.vae_scale_factor),
            temporal_compression=1,
            multiple=2,
            shift=shift,
            dynamic_shift=dynamic,
        )

    @torch.no_grad()
    def prepare(self, condition: Condition) -> FluxView:
        """Encode the prompt once (CLIP pooled + T5 tokens); the control image, if any."""
        tensors = ("control_image", "depth") if self.control else ("box",)
        check_keys(condition, tensors, ("guidance_scale", "true_cfg_scale"))
        box = read_box(condition, self.layout.multiple)
        guidance = condition_scalar(condition, "guidance_scale", self.guidance_scale)
        true_cfg = condition_scalar(condition, "true_cfg_scale", self.true_cfg_scale)
        negative = condition.negative_text or self.negative_prompt
        pixels = _control_pixels(condition)
        if self.control and pixels is None:
            raise ExpertError.invalid(
                "condition.tensors[control_image]", "a control model needs a control_image or depth"
            )
        prompt = self._encode(condition.text)
        # the pipeline's rule: true CFG runs only with a scale > 1 and a negative prompt
        uncond = self._encode(negative) if true_cfg > 1 and negative else None
        control = None if pixels is None else self._control_tokens(pixels)
        view = FluxView(self, prompt, guidance, control, box)
        if uncond is not None:
            view.true_cfg = (true_cfg, uncond)
        return view

    def _encode(self, text: str) -> tuple[Tensor, Tensor, Tensor]:
        """(T5 token embeddings, CLIP pooled embedding, text ids) of one prompt."""
        return self.pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )

    @torch.no_grad()
    def _control_tokens(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """VAE latents of the control image, packed: ((1, h/2·w/2, 64), (h, w))."""
        s = self.layout.spatial_compression
        field = "condition.tensors[control_image]"
        check_multiple(pixels, field, (2, 3), 2 * s)
        z = self.encode(pixels)
        c, h, w = z.shape[1:]
        return self.pipe._pack_latents(z.to(self.transformer_dtype), 1, c, h, w), (h, w)

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        """FLUX's grid: linspace(1, 1/N, N), dynamically shifted by the image token count."""
        check_steps(num_steps)
        _, height, width = _grid(sample_shape, self.layout.channels)
        scheduler = self.fresh_scheduler()
        config = scheduler.config
        sigmas = (
            None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        )
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler_sigmas(scheduler)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Unpacked latents (B, 16, H/s, W/s) of pixels in [-1, 1]."""
        vae = self.pipe.vae
        check_pixels(pixels, "pixels", int(vae.config.in_channels), 4)
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        return z.to(pixels.device, pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [-1, 1] of unpacked latents."""
        vae = self.pipe.vae
        check_pixels(latents, "latents", self.layout.channels, 4)
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1).to(latents.device, latents.dtype)


def _grid(sample_shape: tuple[int, ...], channels: int) -> tuple[int, int, int]:
    if len(sample_shape) != 3 or sample_shape[0] != channels:
        raise ExpertError.invalid(
            "sample_shape", f"{list(sample_shape)}, expected [{channels}, H, W]"
        )
    c, h, w = (int(s) for s in sample_shape)
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ExpertError.invalid("sample_shape", "H and W must be even (2×2 packing)")
    return c, h, w


class FluxView(FamilyView):
    """One prepared FLUX condition: prompt embeddings, guidance, optional image tokens.

    ``control``: tokens concatenated with the latent tokens along channels at every call, and
    their latent grid (h, w): a control image's latents (FLUX control), or the masked image's
    latents ‖ the mask (FLUX Fill, :mod:`~.fill`).
    """

    def __init__(
        self,
        expert: FluxExpert,
        prompt: tuple[Tensor, Tensor, Tensor],
        guidance: float,
        control: tuple[Tensor, tuple[int, int]] | None,
        box: tuple[int, int, int, int] | None = None,
    ) -> None:
        super().__init__(expert, box)
        self.prompt = prompt
        self.guidance = guidance
        self.control = control
        self.true_cfg: tuple[float, tuple[Tensor, Tensor, Tensor]] | None = None

    def _velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """v(x_σ, σ) for unpacked latents (B, 16, H, W)."""
        expert: FluxExpert = self.expert  # type: ignore[assignment]
        pipe = expert.pipe
        check_batch(x, sigma, expert.layout.channels, 4)
        check_multiple(x, "x", (2, 3), 2)
        b, c, h, w = x.shape
        dtype, device = expert.transformer_dtype, expert.device
        tokens = pipe._pack_latents(x.to(device, dtype), b, c, h, w)
        if self.control is not None:
            control, grid = self.control
            if grid != (h, w):
                raise ExpertError.invalid(
                    "x.shape",
                    f"latent grid {[h, w]} does not match the condition image's {list(grid)}",
                )
            tokens = torch.cat([tokens, control.expand(b, -1, -1)], dim=2)
        image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance, device=device, dtype=torch.float32).expand(b)
        t = timesteps(sigma.to(device), pipe.scheduler.config.num_train_timesteps, dtype)

        def run(prompt: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            embeds, pooled, text_ids = prompt
            return pipe.transformer(
                hidden_states=tokens,
                timestep=t / 1000,
                guidance=guidance,
                pooled_projections=pooled.expand(b, -1),
                encoder_hidden_states=embeds.expand(b, -1, -1),
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]

        v = run(self.prompt)
        if self.true_cfg is not None:  # v = v_neg + s·(v − v_neg), a second call as the pipeline
            scale, negative = self.true_cfg
            v_neg = run(negative)
            v = v_neg + scale * (v - v_neg)
        s = expert.layout.spatial_compression
        return pipe._unpack_latents(v, h * s, w * s, s).to(x.device, x.dtype)
