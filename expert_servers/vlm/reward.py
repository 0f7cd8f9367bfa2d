"""The VQAScore reward expert, independent of the backend that runs the VLM.

:class:`VQAReward` is a DISCRIMINATIVE expert with ``pixel_input``: the kernel hands it decoded
pixels in [0, 1], ``(B, C, H, W)`` images or ``(B, C, F, H, W)`` videos (C = 3, or 1 for
grey), never latents. ``prepare(condition)`` reads the questions (see
:mod:`.questions`) and returns a :class:`VQAView`, whose ``log_potential(pixels)`` is, per
sample::

    r(x) = Σ_q w_q · s_q(x),   s_q = log P(Yes | x, q)   or, normalised,
                               s_q = log P(Yes | x, q) / (P(Yes | x, q) + P(No | x, q))

For a video, ``frames`` frames are taken at uniformly spaced indices
``round(linspace(0, F − 1, frames))`` (all of them when F ≤ frames) and s_q is the mean of the
frames' scores (a geometric mean of the probabilities).

The backend (a :class:`Judge`) answers one question for a list of PIL images at a time: the
images of one call are scored in chunks of at most ``max_batch`` (a model option), resized by
the model's own processor. Pixels become 8-bit RGB images, as any image file would.

Without a handle (``LogProb`` on the bare model) there is no question to ask:
FAILED_PRECONDITION on ``handle``. Bad pixels: INVALID_ARGUMENT on ``x.shape`` (rank, channels)
or ``x`` (values outside [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition
from poegen.expert_servers.vlm import scoring
from poegen.expert_servers.vlm.questions import Query, parse_condition
from poegen.kernel.experts import ExpertInfo, ExpertKind
from poegen.kernel.refusal import ExpertError


class Judge(Protocol):
    """A VLM answering one question about several images."""

    def answer(self, images: Sequence[Image.Image], question: str) -> tuple[Tensor, Tensor]:
        """(log P(Yes), log P(No)) per image, each ``(len(images),)`` float64 on the CPU."""
        ...


@dataclass(frozen=True, slots=True)
class RewardOptions:
    """Model options shared by the backends.

    Attributes:
        max_batch: images per backend call.
        frames: video frames scored per sample (handles may override).
        normalize: default score mode (handles may override).
        name: the expert's name in ``Describe``.
    """

    max_batch: int = 8
    frames: int = 8
    normalize: bool = False
    name: str = "vqascore"


class VQAReward:
    """The served expert: describes itself and prepares questions into :class:`VQAView`\\ s."""

    def __init__(self, judge: Judge, options: RewardOptions, *, model_id: str = "") -> None:
        self.judge = judge
        self.options = options
        self.model_id = model_id

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name=self.options.name,
            kind=ExpertKind.DISCRIMINATIVE,
            model_id=self.model_id,
            pixel_input=True,
        )

    def prepare(self, condition: Condition) -> VQAView:
        query = parse_condition(
            condition, normalize=self.options.normalize, frames=self.options.frames
        )
        return VQAView(self, query)

    def log_potential(self, x0: Tensor) -> Tensor:
        raise ExpertError.failed_precondition(
            "handle", "a VQAScore reward needs questions: Prepare a condition and pass its handle"
        )


@dataclass(frozen=True, slots=True)
class VQAView:
    """The reward for one :class:`Query` (what ``Prepare`` returned)."""

    reward: VQAReward
    query: Query

    def describe(self) -> ExpertInfo:
        return self.reward.describe()

    def log_potential(self, x0: Tensor) -> Tensor:
        """Σ_q w_q·s_q per sample, ``(B,)`` float64; ``x0`` are pixels in [0, 1]."""
        frames = frame_indices(check_pixels(x0), self.query.frames)
        images = to_images(x0, frames)  # B·F' images, sample-major
        per_frame = max(1, len(frames))
        total = torch.zeros(x0.shape[0], dtype=torch.float64)
        for q in self.query.questions:
            s = self.scores(images, q.text).view(x0.shape[0], per_frame).mean(1)
            total += q.weight * s
        return total

    def scores(self, images: Sequence[Image.Image], question: str) -> Tensor:
        """s_q of each image, asked in chunks of ``max_batch``."""
        size = self.reward.options.max_batch
        parts = []
        for lo in range(0, len(images), size):
            log_yes, log_no = self.reward.judge.answer(images[lo : lo + size], question)
            parts.append(scoring.score(log_yes, log_no, normalize=self.query.normalize))
        return torch.cat(parts)


def check_pixels(x: Tensor) -> Tensor:
    """Refuse anything but images/videos of 1 or 3 channels with values in [0, 1]."""
    if x.ndim not in (4, 5):
        raise ExpertError.invalid(
            "x.shape",
            f"{x.ndim} dimensions; a VLM reward takes pixels (B, C, H, W) or (B, C, F, H, W)",
        )
    if x.shape[1] not in (1, 3):
        raise ExpertError.invalid("x.shape", f"{x.shape[1]} channels at dim 1, expected 3 or 1")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ExpertError.invalid(
            "x", f"pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
        )
    return x


def frame_indices(x: Tensor, frames: int) -> list[int]:
    """Uniformly spaced frame indices of a video ``(B, C, F, H, W)``; [] for images."""
    if x.ndim == 4:
        return []
    count = x.shape[2]
    if count <= frames:
        return list(range(count))
    return torch.linspace(0, count - 1, frames).round().long().tolist()


def to_images(x: Tensor, frames: Sequence[int]) -> list[Image.Image]:
    """8-bit RGB PIL images, sample-major (all frames of sample 0, then sample 1 …)."""
    if frames:
        x = x[:, :, list(frames)].transpose(1, 2).flatten(0, 1)  # (B·F', C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    u8 = (x.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    arrays = u8.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
