"""From a rendering to tensors: control-ready depth, and masks at the sample's resolution.

**Depth for control models.** diffusers' depth-control models (FLUX.1-Depth through
``FluxControlPipeline``, SD/SDXL depth ControlNets, Wan/VACE depth videos) are trained on
monocular depth estimators' output (Depth Anything, MiDaS): *relative inverse depth*,
normalised to [0, 1] with near = 1 (white) and far = 0 (black). :func:`control_depth` gives
exactly that from metric depth z::

    d = (1/z − min 1/z) / (max 1/z − min 1/z)      min, max over every hit pixel of the clip

normalised once per clip (not per frame, so a video's brightness does not flicker), and 0 where
the ray hits nothing. FLUX's control expert maps it to pixels as 2·d − 1 itself.

**Masks at the sample's resolution.** A pixel mask ``(F, H, W)`` maps to a sample of shape
``(C, h, w)`` (image, F = 1) or ``(C, f, h, w)`` (video):

* spatially, each latent cell takes the fraction of its s×s pixels inside the mask
  (s = H/h = W/w, the VAE's spatial compression; average pooling);
* in time (video), latent frame 0 covers pixel frame 0 and latent frame j ≥ 1 covers pixel
  frames (j−1)·t + 1 … j·t, t = (F − 1)/(f − 1) (Wan's causal VAE: t = 4, F = 4k + 1); the
  fractions are averaged over those frames;
* ``mode`` turns fractions into the mask: ``"fraction"`` keeps them (a soft blend),
  ``"any"`` is 1 where any covered pixel is inside (the region grows to whole cells),
  ``"all"`` is 1 only where every covered pixel is inside (it shrinks);
* the mask is the same for every channel.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from poegen.kernel.refusal import ExpertError

MaskMode = Literal["fraction", "any", "all"]
MASK_MODES = ("fraction", "any", "all")


def control_depth(depth: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Relative inverse depth in [0, 1] (near = 1), 0 where nothing is hit; any shape."""
    out = np.zeros(depth.shape, np.float32)
    if not hit.any():
        return out
    inverse = 1.0 / np.maximum(depth[hit].astype(np.float64), 1e-9)
    low, high = inverse.min(), inverse.max()
    out[hit] = 1.0 if high <= low else (inverse - low) / (high - low)
    return out


def temporal_groups(frames: int, latent_frames: int) -> list[range]:
    """Pixel frames covered by each latent frame (causal video VAE layout)."""
    if latent_frames == frames:
        return [range(i, i + 1) for i in range(frames)]
    if latent_frames < 1 or latent_frames > frames or (frames - 1) % max(latent_frames - 1, 1):
        raise ExpertError.invalid(
            "frames",
            f"{frames} frames do not map onto {latent_frames} latent frames "
            "(expected F = 1 + t·(f − 1))",
        )
    if latent_frames == 1:
        return [range(0, frames)]
    t = (frames - 1) // (latent_frames - 1)
    return [range(0, 1), *(range((j - 1) * t + 1, j * t + 1) for j in range(1, latent_frames))]


def mask_to_sample(mask: Tensor, sample_shape: tuple[int, ...], mode: MaskMode) -> Tensor:
    """A pixel mask ``(F, H, W)`` → the sample shape (see the module docstring)."""
    frames, height, width = mask.shape
    if len(sample_shape) == 3:
        if frames != 1:
            raise ExpertError.invalid("frames", f"an image sample takes 1 frame, got {frames}")
        channels, h, w = sample_shape
        per_frame = mask.float()
    elif len(sample_shape) == 4:
        channels, f, h, w = sample_shape
        groups = temporal_groups(frames, f)
        per_frame = torch.stack([mask[list(g)].float().mean(0) for g in groups])
    else:
        raise ExpertError.invalid(
            "sample_shape", f"{sample_shape}: expected (C, H, W) or (C, F, H, W)"
        )
    if height % h or width % w or height // h != width // w:
        raise ExpertError.invalid(
            "width", f"{height}×{width} pixels do not pool evenly onto {h}×{w} latent cells"
        )
    s = height // h
    fraction = F.avg_pool2d(per_frame[:, None], kernel_size=s)[:, 0]
    if mode == "any":
        fraction = (fraction > 0).float()
    elif mode == "all":
        fraction = (fraction >= 1 - 1e-6).float()
    out = fraction.unsqueeze(0).expand(channels, *fraction.shape)
    return (out[:, 0] if len(sample_shape) == 3 else out).contiguous()
