"""The temporal tie: a digit keeps its appearance from one frame to the next while it moves.

A video's frames f−1 and f show the same digit in two boxes (top-left pixels (t₀, l₀) and
(t₁, l₁), both ``size``×``size``). :class:`FrameTie` is the Gaussian tie on the difference of
the two crops, flat in every other direction::

    d(x) = P₁·x_f − P₀·x_{f−1},     φ(x0) = −(w/2)·‖d(x0)‖²

(P the crop of a box). It is a constraint expert with an exact noised score (capabilities
``SCORE`` and ``LOG_PROB``, like :class:`~poegen.expert_servers.masked.MaskedTarget` with
``score=True``): on the flow path x_σ = (1 − σ)·x0 + σ·ε the two crops see independent noise,
so under the tie d(x_σ) = (1 − σ)·d(x0) + σ·(P₁ε_f − P₀ε_{f−1}) ~ N(0, v_σ·I) with

    v_σ = (1 − σ)²/w + 2σ²,     log q_σ(x_σ) = −‖d(x_σ)‖² / (2·v_σ)   (+ a σ-only constant)
    ∇_{x_f} log q_σ = −P₁ᵀ d / v_σ,     ∇_{x_{f−1}} log q_σ = +P₀ᵀ d / v_σ

**Anchored** (a tensor ``reference`` in the condition): frame f−1 is already made (the
previous chunk's last frame in autoregressive sampling) and enters as a clean constant r =
P₀·x_{f−1}; the expert then sees frame f alone and

    d = P₁·x_f − (1 − σ)·r,     v_σ = (1 − σ)²/w + σ²

(exactly ``MaskedTarget``'s noised tie on the box). The kernel sums w_c·score into every MCMC
move and w_c·log q_σ into the Feynman–Kac weights (``poegen.kernel.target``).

Samples are grey frames ``(B, F, H, W)`` with F = 2 (pair) or 1 (anchored): the expert sees
the two frames of a video ``(frames, H, W)`` through a factor's ``crop`` over (frame, row,
column), ``[[f−1, f+1], [0, H], [0, W]]``. The condition's scalars give the boxes, ``top0``,
``left0`` (frame f−1; not needed when anchored) and ``top1``, ``left1`` (frame f), and
optionally ``weight``; the unprepared expert answers nothing. Served by ``poegen serve analytic`` (entry point
``frame_tie``)::

    expert: frame_tie
    params: {size: 16, weight: 8.0}
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind
from poegen.kernel.refusal import ExpertError

__all__ = ["FrameTie", "TiedBoxes"]

BOX_SCALARS = ("top0", "left0", "top1", "left1")


@dataclass(frozen=True, slots=True)
class TiedBoxes:
    """The boxes of frames f−1 and f (top-left pixels), and the anchor r if f−1 is made."""

    top0: int
    left0: int
    top1: int
    left1: int
    reference: Tensor | None = None  # (size, size): P₀·x_{f−1}, clean


class FrameTie:
    """Gaussian tie between a digit's crops in consecutive frames (see the module docstring).

    Args:
        size: the side of the boxes in pixels.
        weight: w > 0, the tie's precision on the crop difference.
        name: the expert's name.
    """

    def __init__(
        self, size: int = 16, weight: float = 1.0, *, name: str = "frame_tie",
        boxes: TiedBoxes | None = None,
    ) -> None:  # fmt: skip
        if int(size) != size or size < 1:
            raise ValueError(f"size: must be a positive integer, got {size}")
        weight = float(weight)
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight: must be positive and finite, got {weight}")
        self.size = int(size)
        self.weight = weight
        self.boxes = boxes
        self._name = str(name)

    def describe(self) -> ExpertInfo:
        digest = hashlib.sha256(f"{self.size}:{self.weight!r}:{self.boxes}".encode())
        if self.boxes is not None and self.boxes.reference is not None:
            digest.update(self.boxes.reference.numpy().tobytes())
        return ExpertInfo(
            name=self._name,
            kind=ExpertKind.CONSTRAINT,
            capabilities=frozenset({Capability.SCORE, Capability.LOG_PROB}),
            model_id="frame-tie",
            revision=digest.hexdigest()[:12],
            latent_space="pixels-1",
        )

    # ------------------------------------------------------------------ conditions

    def prepare(self, condition: Condition) -> FrameTie:
        """The tie between the condition's boxes (scalars ``top0``, ``left0``, ``top1``,
        ``left1``; optional ``weight``), anchored when it has a tensor ``reference``."""
        unknown = sorted(set(condition.scalars) - {*BOX_SCALARS, "weight"})
        unknown += sorted(set(condition.tensors) - {"reference"})
        if condition.text or unknown:
            what = "text" if condition.text else unknown[0]
            raise ExpertError.invalid(
                f"condition.{what}", "not understood by frame_tie (scalars: top0, left0, "
                "top1, left1, weight; tensors: reference)",
            )  # fmt: skip
        anchored = "reference" in condition.tensors
        corners = []
        for name in BOX_SCALARS:
            # anchored, frame f−1's box is already cut out: the reference
            value = condition.scalars.get(name, 0.0 if anchored and name[-1] == "0" else None)
            field = f"condition.scalars[{name}]"
            if value is None:
                raise ExpertError.invalid(field, "required")
            if not (math.isfinite(value) and value == int(value) and value >= 0):
                raise ExpertError.invalid(field, f"{value}, expected an integer >= 0")
            corners.append(int(value))
        weight = condition.scalars.get("weight", self.weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ExpertError.invalid("condition.scalars[weight]", "must be positive and finite")
        reference = condition.tensors.get("reference")
        if anchored:
            reference = self._checked_reference(reference)
        boxes = TiedBoxes(*corners, reference=reference)
        return FrameTie(self.size, weight, name=self._name, boxes=boxes)

    def _checked_reference(self, reference: Tensor) -> Tensor:
        field = "condition.tensors[reference]"
        if not reference.is_floating_point():
            raise ExpertError.invalid(field, f"expected floating point, got {reference.dtype}")
        if reference.numel() != self.size * self.size:
            raise ExpertError.invalid(
                field, f"shape {list(reference.shape)}, expected [{self.size}, {self.size}]"
            )
        reference = reference.detach().to("cpu", torch.float32).reshape(self.size, self.size)
        if not torch.isfinite(reference).all():
            raise ExpertError.invalid(field, "must be finite")
        return reference.clone()

    # ------------------------------------------------------------------ the tie

    def difference(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(d, v_σ): the crop difference ``(B, size, size)`` and its noised variance ``(B,)``."""
        boxes = self._boxes(x)
        s = sigma.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        later = self._crop(x[:, -1], boxes.top1, boxes.left1)
        if boxes.reference is None:
            earlier = self._crop(x[:, 0], boxes.top0, boxes.left0)
            variance = (1 - s) ** 2 / self.weight + 2 * s**2
        else:
            ref = boxes.reference.to(device=x.device, dtype=x.dtype)
            earlier = (1 - s).to(x.dtype).reshape(-1, 1, 1) * ref
            variance = (1 - s) ** 2 / self.weight + s**2
        return later - earlier, variance.to(x.dtype)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log q_σ(x_σ) = −‖d‖²/(2·v_σ), up to a σ-only constant; shape ``(B,)``."""
        d, variance = self.difference(x, sigma)
        return -0.5 * d.flatten(1).square().sum(1) / variance

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """∇ log q_σ: −d/v_σ on frame f's box, +d/v_σ on frame f−1's (pair only)."""
        d, variance = self.difference(x, sigma)
        boxes = self._boxes(x)
        g = d / variance.reshape(-1, 1, 1)
        out = torch.zeros_like(x)
        self._crop(out[:, -1], boxes.top1, boxes.left1).sub_(g)
        if boxes.reference is None:
            self._crop(out[:, 0], boxes.top0, boxes.left0).add_(g)
        return out

    def log_potential(self, x0: Tensor) -> Tensor:
        """φ(x0) = −(w/2)·‖d(x0)‖² (the tie at σ = 0)."""
        return self.log_prob(x0, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device))

    # ------------------------------------------------------------------ helpers

    def _crop(self, frame: Tensor, top: int, left: int) -> Tensor:
        return frame[:, top : top + self.size, left : left + self.size]

    def _boxes(self, x: Tensor) -> TiedBoxes:
        boxes = self.boxes
        if boxes is None:
            raise ExpertError.failed_precondition(
                "handle", "prepare the tie with its boxes first (Prepare)"
            )
        frames = 1 if boxes.reference is not None else 2
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
            raise ExpertError.invalid("x", "expected floating frames (B, F, H, W)")
        if x.shape[1] != frames:
            what = "anchored (a reference)" if frames == 1 else "a pair"
            raise ExpertError.invalid(
                "x.shape", f"{list(x.shape)}: the tie is {what}, it takes {frames} frame(s)"
            )
        height, width = x.shape[-2:]
        for top, left in ((boxes.top0, boxes.left0), (boxes.top1, boxes.left1)):
            if top + self.size > height or left + self.size > width:
                raise ExpertError.invalid(
                    "x.shape", f"a {self.size}-pixel box at ({top}, {left}) leaves the "
                    f"{height}×{width} frame",
                )  # fmt: skip
        return boxes
