"""Layout-controlled generation with digit experts: "a 3 here, a 7 there" on a larger canvas.

The paper's first application (regional experts per box × a background × a reward per box)
in the digits world. The canvas is ``(1, 20, 52)``; each :class:`Box` is a 16×16 window with a
label, and neighbouring boxes overlap by four columns, so the digits must agree where they
meet (a product, not a collage). The factors:

* per box, the class-conditional prior ``flow-cond`` prepared with the box's label
  (``class_label``), **cropped** to the box: it sees the 16×16 window it was trained on and
  its factor is p(x_box | label) (``poegen.kernel.crop``);
* the background :class:`~poegen.expert_servers.digits.background.BlankCanvas` over the whole
  canvas, with the complement of the boxes as its region (where no box is, the canvas is
  empty);
* per box, the reward classifier's log p(label | x̂_0[box]) (cropped too), scale λ.

The target is Π_b p(x_b | y_b) · p_bg(x_outside) · Π_b p(y_b | x̂_0[b])^λ: on overlaps the two
priors' scores add. Judged by the held-out classifier on each box's crop (the share of boxes
it gives their label) and by the stray ink outside the boxes (the share of pixels there
brighter than 0.25; 0 = empty).

Baselines (:func:`paste`, and the kernel without MCMC or SMC) are in ``bench/apps.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from poegen.expert_servers.digits.background import BLACK, BlankCanvas
from poegen.expert_servers.digits.train import LABEL_NAMES
from poegen.kernel.spec import Factor, SamplerSettings

BOX_SIZE = 16
CANVAS = (1, 20, 58)
REWARD_WEIGHT = 4.0
STEP_SIZE = 0.2
BACKGROUND_STD = 0.05


@dataclass(frozen=True, slots=True)
class Box:
    """A 16×16 window of the canvas (its top-left pixel) and the digit wanted there."""

    label: int
    top: int
    left: int

    @property
    def window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """[start, stop) of rows and columns: a factor's ``crop``."""
        return ((self.top, self.top + BOX_SIZE), (self.left, self.left + BOX_SIZE))

    def of(self, x: Tensor) -> Tensor:
        """The box's crop of canvases ``(..., H, W)``."""
        (r0, r1), (c0, c1) = self.window
        return x[..., r0:r1, c0:c1]


LAYOUT = (Box(3, 0, 0), Box(7, 4, 14), Box(2, 0, 28), Box(5, 4, 42))


def boxes_mask(boxes: Sequence[Box], canvas: tuple[int, ...] = CANVAS) -> Tensor:
    """1 inside any box, 0 elsewhere, shape ``canvas``."""
    mask = torch.zeros(canvas)
    for box in boxes:
        box.of(mask).fill_(1)
    return mask


def background_region(boxes: Sequence[Box], canvas: tuple[int, ...] = CANVAS) -> Tensor:
    """Where the background expert counts: outside every box."""
    return 1 - boxes_mask(boxes, canvas)


def settings(scale: float = 1.0) -> SamplerSettings:
    """poegen's settings for the layout (``scale`` multiplies the particles)."""
    return SamplerSettings(
        num_particles=max(4, int(64 * scale)), num_steps=20, mcmc_steps=1, step_size=STEP_SIZE
    )


def factors(
    prior: Any, reward: Any, boxes: Sequence[Box] = LAYOUT, canvas: tuple[int, ...] = CANVAS
) -> tuple[Factor, ...]:
    """The product in process: ``prior`` the class-conditional flow expert, ``reward`` the
    reward classifier (both unprepared)."""
    from poegen.expert_servers.server.adapter import Condition

    priors, rewards = [], []
    for i, box in enumerate(boxes):
        label = LABEL_NAMES[box.label]
        prepared = prior.prepare(Condition(scalars={"class_label": float(box.label)}))
        priors.append(Factor(prepared, name=f"digit-{i}", crop=box.window))
        judged = reward.prepare(Condition(text=label))
        rewards.append(
            Factor(judged, weight=REWARD_WEIGHT, name=f"is-{label}-{i}", crop=box.window)
        )
    _, height, width = canvas
    background = Factor(
        BlankCanvas(height, width, BACKGROUND_STD),
        region=background_region(boxes, canvas),
        name="background",
    )
    return (*priors, background, *rewards)


def paste(digits: Sequence[Tensor], boxes: Sequence[Box] = LAYOUT) -> Tensor:
    """Each box's own samples ``(N, 1, 16, 16)`` pasted in order onto empty canvases (a later
    box overwrites an earlier one where they overlap): the collage without a product."""
    canvas = torch.full((digits[0].shape[0], *CANVAS), BLACK, dtype=digits[0].dtype)
    for box, x in zip(boxes, digits, strict=True):
        box.of(canvas).copy_(x)
    return canvas


def judge_boxes(judge: Any, x0: Tensor, boxes: Sequence[Box] = LAYOUT) -> Tensor:
    """``(N, len(boxes))`` booleans: the judge gives box b of canvas n its label."""
    from poegen.expert_servers.digits.compose import to_pixels

    hits = []
    for box in boxes:
        classes = judge.log_probs(to_pixels(box.of(x0)).contiguous()).argmax(-1)
        hits.append(classes == box.label)
    return torch.stack(hits, dim=1)


def background_ink(x0: Tensor, boxes: Sequence[Box] = LAYOUT, threshold: float = 0.25) -> Tensor:
    """Per canvas ``(N,)``: the share of pixels outside every box brighter than ``threshold``
    (pixels in [0, 1]); 0 is an empty background."""
    from poegen.expert_servers.digits.compose import to_pixels

    outside = background_region(boxes, tuple(x0.shape[1:])).bool()
    return (to_pixels(x0)[:, outside] > threshold).float().mean(-1)
