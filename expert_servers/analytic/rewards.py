"""Analytic rewards: discriminative experts with closed-form tilts of Gaussian mixtures.

Each is a log-potential r(x₀) per clean sample (``log_potential(x0) -> (B,)``); the factor's
weight λ makes it exp(λ·r) in the product. Parameters may have the sample shape ``S`` (or be
flat with ``sample_shape`` given); inputs ``(B, *S)`` are flattened row-major.

* ``LinearReward``:    r(x) = aᵀx + b                         (Gaussian tilt: shifts means)
* ``QuadraticReward``: r(x) = b − ½ (x − c)ᵀ A (x − c)        (Gaussian factor, precision λA)
* ``SigmoidReward``:   r(x) = log σ(k (aᵀx − b)), k > 0        (bounded above by 0, saturating:
  a VLM-like log-probability of "yes"; exact to 1-D quadrature along a)

All are autograd-differentiable, for samplers that want ∇r (TDS, DAS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from poegen.expert_servers.analytic._checks import (
    PotentialExpert,
    as_max_batch,
    as_param,
    resolve_shape,
)
from poegen.kernel.experts import ExpertKind


def _direction(
    value: Tensor | Sequence, field: str, sample_shape: Sequence[int] | None
) -> tuple[Tensor, tuple[int, ...]]:
    """A non-zero direction flattened to ``(d,)``, and its sample shape (default its own)."""
    a = as_param(value, field)
    if a.ndim == 0 or a.numel() == 0:
        raise ValueError(f"{field}: expected a vector or an array of the sample shape")
    if not (a != 0).any():
        raise ValueError(f"{field}: must not be zero")
    shape = resolve_shape(sample_shape or tuple(a.shape), a.numel(), "sample_shape")
    return a.reshape(-1), shape


def _scalar(value: float, field: str) -> float:
    t = as_param(value, field)
    if t.ndim != 0:
        raise ValueError(f"{field}: expected a scalar, got shape {tuple(t.shape)}")
    return float(t)


class _Reward(PotentialExpert):
    _kind = ExpertKind.DISCRIMINATIVE


class LinearReward(_Reward):
    """r(x) = aᵀx + b.  ``direction`` a: shape S (or ``(d,)`` with ``sample_shape``)."""

    def __init__(
        self,
        direction: Tensor | Sequence,
        offset: float = 0.0,
        *,
        name: str = "linear_reward",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        self._direction, self._shape = _direction(direction, "direction", sample_shape)
        self._offset = _scalar(offset, "offset")
        self._name, self._max_batch = str(name), as_max_batch(max_batch)

    def _params(self) -> tuple[Tensor, ...]:
        return self._direction, torch.tensor([self._offset], dtype=torch.float64)

    def log_potential(self, x0: Tensor) -> Tensor:
        """aᵀx + b, ``(B,)``."""
        x = self._flat(x0)
        return (x @ self._direction.to(x) + self._offset).to(x0.dtype)

    @property
    def direction(self) -> Tensor:
        """a, ``(d,)``."""
        return self._direction

    @property
    def offset(self) -> float:
        return self._offset


class QuadraticReward(_Reward):
    """r(x) = b − ½ (x − c)ᵀ A (x − c).

    Args:
        precision: A, full ``(d, d)`` symmetric or diagonal ``(d,)``. Positive semi-definite A
            makes r a concave "closeness to c" reward; others are allowed as long as the tilted
            product stays normalisable.
        center: c, shape S or ``(d,)``; default 0.
        offset: b.

    DAS's toy rewards (α = 1): grid −x₁²/100 − x₂² is A = diag(0.02, 2), c = 0; ring
    −x₁² − (x₂ − 1)²/10 is A = diag(2, 0.2), c = (0, 1).
    """

    def __init__(
        self,
        precision: Tensor | Sequence,
        center: Tensor | Sequence | None = None,
        offset: float = 0.0,
        *,
        name: str = "quadratic_reward",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        a = as_param(precision, "precision")
        if a.ndim == 1:
            a = torch.diag(a)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
            raise ValueError(f"precision: expected (d, d) or (d,), got {tuple(a.shape)}")
        if not torch.allclose(a, a.mT, rtol=0, atol=1e-12 * a.abs().max().item()):
            raise ValueError("precision: must be symmetric")
        d = a.shape[0]
        c = torch.zeros(d, dtype=torch.float64) if center is None else as_param(center, "center")
        if c.numel() != d:
            raise ValueError(f"center: expected {d} values, got {c.numel()}")
        shape = sample_shape or (tuple(c.shape) if center is not None and c.ndim > 1 else None)
        self._shape = resolve_shape(shape, d, "sample_shape")
        self._precision, self._center = 0.5 * (a + a.mT), c.reshape(-1)
        self._offset = _scalar(offset, "offset")
        self._name, self._max_batch = str(name), as_max_batch(max_batch)

    def _params(self) -> tuple[Tensor, ...]:
        return self._center, self._precision, torch.tensor([self._offset], dtype=torch.float64)

    def log_potential(self, x0: Tensor) -> Tensor:
        """b − ½ (x − c)ᵀ A (x − c), ``(B,)``."""
        x = self._flat(x0)
        r = x - self._center.to(x)
        return (self._offset - 0.5 * ((r @ self._precision.to(x)) * r).sum(-1)).to(x0.dtype)

    @property
    def precision(self) -> Tensor:
        """A, ``(d, d)``."""
        return self._precision

    @property
    def center(self) -> Tensor:
        """c, ``(d,)``."""
        return self._center

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def diagonal(self) -> bool:
        return bool((self._precision == torch.diag(torch.diagonal(self._precision))).all())


class SigmoidReward(_Reward):
    """r(x) = log σ(k (aᵀx − b)) ≤ 0: ≈ 0 far on the side aᵀx > b, ≈ k(aᵀx − b) on the other.

    ``direction`` a (shape S, or ``(d,)`` with ``sample_shape``), ``offset`` b, ``sharpness``
    k > 0. Computed with ``logsigmoid``, so it never overflows.
    """

    def __init__(
        self,
        direction: Tensor | Sequence,
        offset: float = 0.0,
        sharpness: float = 1.0,
        *,
        name: str = "sigmoid_reward",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        self._direction, self._shape = _direction(direction, "direction", sample_shape)
        self._offset = _scalar(offset, "offset")
        self._sharpness = _scalar(sharpness, "sharpness")
        if self._sharpness <= 0:
            raise ValueError(f"sharpness: must be positive, got {sharpness}")
        self._name, self._max_batch = str(name), as_max_batch(max_batch)

    def _params(self) -> tuple[Tensor, ...]:
        extra = torch.tensor([self._offset, self._sharpness], dtype=torch.float64)
        return self._direction, extra

    def log_potential(self, x0: Tensor) -> Tensor:
        """log σ(k (aᵀx − b)), ``(B,)``."""
        x = self._flat(x0)
        return self.of_projection(x @ self._direction.to(x)).to(x0.dtype)

    def of_projection(self, u: Tensor) -> Tensor:
        """r as a function of u = aᵀx: log σ(k (u − b))."""
        return F.logsigmoid(self._sharpness * (u - self._offset))

    @property
    def direction(self) -> Tensor:
        """a, ``(d,)``."""
        return self._direction

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def sharpness(self) -> float:
        return self._sharpness
