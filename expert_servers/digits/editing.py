"""Editing by insertion with digit experts: a rendered bar turns a held-out 6 into an 8.

The paper's second application (a graphics engine's render inserted into an input image) in
the digits world. The graphics expert (:mod:`poegen.expert_servers.graphics`) renders a box
mesh posed so that its silhouette is a vertical bar at rows 1–8, columns 11–14 of the 16×16
image (one world unit = 8 pixels; :data:`PLACEMENT`): on a 6 it closes the top loop, and the
judge calls a 6 with such a bar an 8 more often than a 6. The silhouette is a white stroke:
its target is +1 (pixels in [-1, 1]) inside the mask m. With the keep mask
k = 1 − dilate_r(m) (r = :data:`MARGIN` pixels; the graphics expert's ``keep`` output), the
factors are

* the all-digits prior ``flow-all``, p(x);
* the input kept outside the margin: a :class:`~poegen.expert_servers.masked.MaskedTarget`
  on the input with mask k, proposing (at every level the kept region of x_σ is replaced by
  the noised input (1 − σ)·x_in + σ·ε);
* the tie to the render: a MaskedTarget on +1 with the soft mask α·m (the graphics expert's
  ``insert`` output, opacity α = :data:`OPACITY`), proposing too — at every level the
  silhouette of x_σ moves a share α of the way to the noised stroke,
  x' = (1 − αm)⊙x + αm⊙((1 − σ)·1 + σ·ε), so the render is inserted while the prior and
  the reward still shape it — and its Gaussian log-potential −(w/2)·‖αm⊙(x̂_0 − 1)‖² in the
  weights;
* the target-label reward λ·log p("eight" | x̂_0) of ``classifier-reward``.

Target: p(x) · exp(−(w_k/2)‖k⊙(x̂_0 − x_in)‖²) · exp(−(w_s/2)‖αm⊙(x̂_0 − 1)‖²) · p(8 | x̂_0)^λ.
The returned clean estimates are composited like diffusers' inpainting overlay,
out = k⊙x_in + (1 − k)⊙x̂_0 (:func:`composite`), so the kept region is the input exactly.

Metrics (:func:`metrics`): the share of edits the judge (``classifier-judge``, which steers
nothing) gives the target label; background PSNR outside the mask (torchmetrics, pixels in
[0, 1], data range 1; +inf when the pixels there are the input exactly); the IoU of the
inserted stroke — the bright pixels (> 0.5) of the editable region 1 − k — against the mask.
Baselines (``bench/editing.py``): :func:`paste` (the input with the silhouette set white) and
the prior alone inpainting (prior × keep, no tie, no reward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.kernel.spec import Factor, SamplerSettings

SAMPLE_SHAPE = (1, 16, 16)
SOURCE_DIGIT = 6
TARGET_DIGIT = 8
TARGET_LABEL = "eight"
MESH = "meshes/box.obj"
# a unit box scaled to 0.5 × 1 world units, centred at (0.625, 0.375): at 8 px per unit the
# 4 × 8 pixels of rows 1–8, columns 11–14, seen head-on by a camera at distance 5 whose
# vertical field of view 2·atan(1/5) = 22.62° spans exactly 2 units = 16 pixels
PLACEMENT: dict[str, Any] = {
    "mesh": MESH,
    "scale": [0.5, 1.0, 0.1],
    "position": [0.625, 0.375, 0.0],
    "colour": [1.0, 1.0, 1.0],
    "camera": {"position": [0, 0, 5], "look_at": [0, 0, 0], "up": [0, 1, 0], "fov": 22.62},
    "width": 16,
    "height": 16,
}
BAR = ((1, 9), (11, 15))  # [start, stop) rows and columns the silhouette covers
MARGIN = 0  # measured: a free ring of 1 px lets the prior bleed ink (PSNR 15–17 dB)
OPACITY = 0.6  # measured, 6 held-out 6s, λ = 64: α = 1 (pinned) 0.55, 0.5 0.64, 0.6 0.66, 0.7 0.62
KEEP_WEIGHT = 4.0
STROKE_WEIGHT = 4.0
REWARD_WEIGHT = 64.0
STEP_SIZE = 0.2
BRIGHT = 0.5  # a pixel in [0, 1] above this is ink


def settings(scale: float = 1.0) -> SamplerSettings:
    """poegen's settings for the edit (``scale`` multiplies the particles)."""
    return SamplerSettings(
        num_particles=max(4, int(32 * scale)), num_steps=20, mcmc_steps=1, step_size=STEP_SIZE
    )


def placement_text() -> str:
    """The graphics expert's condition text (JSON) for :data:`PLACEMENT`."""
    return json.dumps(PLACEMENT)


def write_assets(root: Path) -> Path:
    """The asset root: a unit box (``trimesh.creation.box``) as ``meshes/box.obj``."""
    import trimesh

    (root / "meshes").mkdir(parents=True, exist_ok=True)
    trimesh.creation.box(extents=(1.0, 1.0, 1.0)).export(root / MESH)
    return root


@dataclass(frozen=True, slots=True)
class Render:
    """The graphics expert's masks for the edit, each ``(1, 16, 16)``.

    Attributes:
        silhouette: m, 1 on the rendered bar.
        keep: k = 1 − dilate_r(m), 1 where the input is kept.
        insert: α·m, the stroke tie's soft mask.
    """

    silhouette: Tensor
    keep: Tensor
    insert: Tensor


def render(root: Path, margin: int = MARGIN, opacity: float = OPACITY) -> Render:
    """Render :data:`PLACEMENT` with the graphics expert in process (asset root ``root``)."""
    from poegen.expert_servers.graphics import GraphicsExpert
    from poegen.expert_servers.server.adapter import Condition

    scalars = {"margin": float(margin), "opacity": float(opacity)}
    out = GraphicsExpert(root).prepare(Condition(text=placement_text(), scalars=scalars)).render()
    return Render(out["silhouette"], out["keep"], out["insert"])


def held_out_sources(count: int) -> Tensor:
    """The first ``count`` held-out digits of :data:`SOURCE_DIGIT`, ``(count, 1, 16, 16)``."""
    from poegen.expert_servers.digits import held_out_indices
    from poegen.expert_servers.digits.data import load_digits16

    digits = load_digits16()
    idx = torch.tensor(held_out_indices())
    chosen = idx[digits.labels[idx] == SOURCE_DIGIT]
    if count > len(chosen):
        raise ValueError(f"count: only {len(chosen)} held-out {SOURCE_DIGIT}s, asked {count}")
    return digits.x0[chosen[:count]]


def factors(prior: Any, reward: Any, image: Tensor, masks: Render) -> tuple[Factor, ...]:
    """The product in process for one input ``image`` ``(1, 16, 16)``: ``prior`` the
    all-digits flow expert, ``reward`` the reward classifier (unprepared)."""
    from poegen.expert_servers.masked import MaskedTarget
    from poegen.expert_servers.server.adapter import Condition

    keep = MaskedTarget(image, masks.keep, KEEP_WEIGHT, name="keep")
    white = torch.ones(SAMPLE_SHAPE)
    stroke = MaskedTarget(white, masks.insert, STROKE_WEIGHT, name="stroke")
    is_target = reward.prepare(Condition(text=TARGET_LABEL))
    return (
        Factor(prior, name="prior"),
        Factor(keep, name="keep"),
        Factor(stroke, name="stroke"),
        Factor(is_target, weight=REWARD_WEIGHT, name=f"is-{TARGET_LABEL}"),
    )


def inpainting_factors(prior: Any, image: Tensor, masks: Render) -> tuple[Factor, ...]:
    """The baseline product: the prior inpainting everything but the kept region."""
    from poegen.expert_servers.masked import MaskedTarget

    keep = MaskedTarget(image, masks.keep, KEEP_WEIGHT, name="keep")
    return (Factor(prior, name="prior"), Factor(keep, name="keep"))


def composite(image: Tensor, x0: Tensor, keep: Tensor) -> Tensor:
    """k⊙x_in + (1 − k)⊙x̂_0 for clean estimates ``(N, 1, H, W)`` (the inpainting overlay)."""
    return keep * image + (1 - keep) * x0


def paste(image: Tensor, silhouette: Tensor) -> Tensor:
    """The input with the silhouette set white (+1): ``(..., 1, H, W)`` like ``image``."""
    return torch.where(silhouette.bool(), torch.ones_like(image), image)


def background_psnr(edited: Tensor, image: Tensor, silhouette: Tensor) -> float:
    """PSNR (dB, torchmetrics, data range 1) of pixels in [0, 1] outside the mask, over all
    edits ``(N, 1, H, W)`` of one input ``(1, H, W)`` together; +inf when they are equal."""
    from torchmetrics.image import PeakSignalNoiseRatio

    from poegen.expert_servers.digits.compose import to_pixels

    outside = ~silhouette.bool().expand(edited.shape)
    reference = to_pixels(image).expand(edited.shape)
    psnr = PeakSignalNoiseRatio(data_range=1.0)
    return float(psnr(to_pixels(edited)[outside], reference[outside]))


def stroke_iou(edited: Tensor, masks: Render) -> Tensor:
    """Per edit ``(N,)``: |S ∩ m| / |S ∪ m|, S the bright pixels (> 0.5) of the editable
    region 1 − k: the inserted stroke against the rendered silhouette."""
    from poegen.expert_servers.digits.compose import to_pixels

    editable = (1 - masks.keep).bool()
    stroke = (to_pixels(edited) > BRIGHT) & editable
    mask = masks.silhouette.bool().expand(stroke.shape)
    inter = (stroke & mask).flatten(1).sum(1)
    union = (stroke | mask).flatten(1).sum(1).clamp(min=1)
    return inter.double() / union.double()


def judge_hits(judge: Any, edited: Tensor) -> Tensor:
    """Per edit ``(N,)``: the judge gives it :data:`TARGET_DIGIT`."""
    from poegen.expert_servers.digits.compose import to_pixels

    return judge.log_probs(to_pixels(edited).contiguous()).argmax(-1) == TARGET_DIGIT


def weighted_mean(values: Tensor, log_weights: Tensor | None) -> float:
    """Σ_i W_i·v_i with W = softmax(log w) (equal weights without ``log_weights``)."""
    if log_weights is None:
        return float(values.double().mean())
    w = torch.softmax(log_weights.double(), 0)
    return float((w * values.double()).sum())


def metrics(
    judge: Any, edited: Tensor, log_weights: Tensor | None, image: Tensor, masks: Render
) -> dict[str, float]:
    """Judge share, background PSNR and stroke IoU of the edits ``(N, 1, H, W)`` of one input
    (the share and IoU are expectations under the edits' weights)."""
    return {
        "judge_share": weighted_mean(judge_hits(judge, edited).double(), log_weights),
        "psnr": background_psnr(edited, image, masks.silhouette),
        "iou": weighted_mean(stroke_iou(edited, masks), log_weights),
    }
