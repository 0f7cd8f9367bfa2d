"""``FluxFillAdapter``: FLUX.1 Fill (inpainting) as a generative expert.

Folders: a ``FluxFillPipeline`` folder (``model_index.json``), e.g. FLUX.1-Fill-dev. The expert
is a :class:`~.flux.FluxExpert` (same unpacked latents ``(B, 16, H, W)``, latent space
``flux-vae-16``, schedule, Encode/Decode, guidance embedding) whose transformer also reads, at
every call, the *fill tokens* of its condition, prepared once at ``Prepare`` with the
pipeline's own helpers, as ``FluxFillPipeline.__call__`` prepares them::

    mask   = pipe.mask_processor.preprocess(mask)        # (1, 1, H, W), binarised at 0.5
    masked = image · (1 − mask)                          # the pixels to keep; 0 where it fills
    z      = mode(VAE(masked))                           # the posterior's mode, see below
    m, zi  = pipe.prepare_mask_latents(mask, z, ...)     # (z − shift)·scale packed: (1, L, 64);
                                                         # the mask as s×s-pixel patches packed:
                                                         # (1, L, 4·s²)   (L = h/2 · w/2)
    fill   = zi ‖ m                                      # (1, L, 64 + 4·s²)
    v = transformer(pack(x) ‖ fill, timestep=t/1000, guidance=g, ...)        # t = σ·1000

(s the VAE scale factor, 8 for FLUX: 64 + 64 + 256 = 384 input channels.)

Conditions (``Prepare``): ``text`` (the prompt, CLIP + T5 through ``encode_prompt``); tensor
``image``, the image to inpaint, pixels in [-1, 1], ``(3, H, W)`` or ``(1, 3, H, W)``; tensor
``mask``, ``(1, H, W)`` or ``(1, 1, H, W)`` in [0, 1] on the same pixel grid, 1 where the model
paints (binarised at 0.5, as the pipeline's mask processor does); H and W multiples of 2·s.
Scalar ``guidance_scale``: the guidance embedding (default: option ``guidance_scale``, else 30,
``FluxFillPipeline``'s default). The pipeline has no negative prompt or true CFG: a
``negative_text`` is refused. x's latent grid must be the image's (H/s, W/s).

The masked image's latents are the VAE posterior's **mode**, where the pipeline samples it with
the call's generator: an expert is a deterministic function of its inputs (as FLUX control).
Options: the common ones plus ``guidance_scale`` and ``max_sequence_length`` (default 512).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import retrieve_latents
from torch import Tensor

from poegen.expert_servers.flow.common import check_keys, check_multiple, condition_scalar
from poegen.expert_servers.flow.flux import FluxAdapter, FluxExpert, FluxView, condition_pixels
from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.refusal import ExpertError

IMAGE, MASK = "condition.tensors[image]", "condition.tensors[mask]"


class FluxFillAdapter(FluxAdapter):
    """Loads FLUX Fill folders (see the module docstring)."""

    pipelines: ClassVar[dict[str, type]] = {"FluxFillPipeline": FluxFillPipeline}
    options: ClassVar[tuple[str, ...]] = ("guidance_scale", "max_sequence_length")
    family: ClassVar[str] = "FLUX Fill"

    def expert(self, pipe: Any, opts: Any, **kw: Any) -> FluxFillExpert:
        return FluxFillExpert(pipe, opts, name="flux_fill", **kw)


class FluxFillExpert(FluxExpert):
    """A FLUX Fill transformer behind poegen's generative-expert protocol."""

    default_guidance = 30.0  # FluxFillPipeline's default

    @torch.no_grad()
    def prepare(self, condition: Condition) -> FluxView:
        """Check the image and mask, build their fill tokens once, encode the prompt once."""
        check_keys(condition, ("image", "mask"), ("guidance_scale",))
        if condition.negative_text:
            raise ExpertError.invalid(
                "condition.negative_text", "FLUX Fill takes no negative prompt"
            )
        guidance = condition_scalar(condition, "guidance_scale", self.guidance_scale)
        image, mask = self._image_and_mask(condition)
        fill = self._fill_tokens(image, mask)
        return FluxView(self, self._encode(condition.text), guidance, fill)

    def _image_and_mask(self, condition: Condition) -> tuple[Tensor, Tensor]:
        """The image (1, 3, H, W) in [-1, 1] and the mask (1, 1, H, W) in [0, 1], checked."""
        for name, field in (("image", IMAGE), ("mask", MASK)):
            if name not in condition.tensors:
                raise ExpertError.invalid(field, "FLUX Fill needs an image and a mask")
        image = condition_pixels(condition.tensors["image"], IMAGE, (3,), -1.0)
        mask = condition_pixels(condition.tensors["mask"], MASK, (1,), 0.0)
        check_multiple(image, IMAGE, (2, 3), 2 * self.layout.spatial_compression)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ExpertError.invalid(
                f"{MASK}.shape",
                f"pixel grid {list(mask.shape[-2:])} differs from the image's "
                f"{list(image.shape[-2:])}",
            )
        return image, mask

    def _fill_tokens(self, image: Tensor, mask: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Masked-image latents ‖ mask, packed: ((1, h/2·w/2, 64 + 4·s²), (h, w))."""
        pipe, vae = self.pipe, self.pipe.vae
        height, width = (int(n) for n in image.shape[-2:])
        mask = pipe.mask_processor.preprocess(mask, height=height, width=width)
        # the pipeline's masked image: the pixels to keep, zero where the model paints
        masked = (image * (1 - mask)).to(vae.device, vae.dtype)
        z = retrieve_latents(vae.encode(masked), sample_mode="argmax")
        # handed as latents (16 channels), prepare_mask_latents skips its own VAE sampling and
        # applies (z − shift)·scale, then packs both
        mask_tokens, image_tokens = pipe.prepare_mask_latents(
            mask, z, 1, int(vae.config.latent_channels), 1, height, width,
            self.transformer_dtype, self.device, None,
        )  # fmt: skip
        s = self.layout.spatial_compression
        return torch.cat((image_tokens, mask_tokens), dim=-1), (height // s, width // s)
