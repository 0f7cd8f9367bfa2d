"""Analytic hard constraints: indicator experts, ``log_potential(x0)`` = 0 inside, −inf outside.

* ``HalfSpace(normal, offset)``: C = {x : nᵀx ≤ offset}. The normal points **out** of the
  allowed set: moving along +n eventually leaves C. The boundary counts as inside.
* ``Box(low, high)``: C = {x : low ≤ x ≤ high} elementwise; bounds may be ±inf.

Neither proposes nor projects: they enter the sampler only through the weights. Parameters
may have the sample shape S (or be flat with ``sample_shape`` given); inputs ``(B, *S)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from poegen.expert_servers.analytic._checks import (
    PotentialExpert,
    as_max_batch,
    as_param,
    resolve_shape,
)
from poegen.kernel.experts import ExpertKind


def _indicator(inside: Tensor) -> Tensor:
    """0 where ``inside``, −inf elsewhere."""
    return torch.where(inside, 0.0, -math.inf).to(torch.float64)


class _Constraint(PotentialExpert):
    _kind = ExpertKind.CONSTRAINT

    def log_potential(self, x0: Tensor) -> Tensor:
        """0 inside, −inf outside, ``(B,)`` in the input's dtype."""
        x = self._flat(x0)
        return _indicator(self.contains(x.reshape(x0.shape))).to(x0.dtype)

    def contains(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class HalfSpace(_Constraint):
    """C = {x : nᵀx ≤ offset}; ``normal`` n (shape S, or ``(d,)`` with ``sample_shape``) ≠ 0."""

    def __init__(
        self,
        normal: Tensor | Sequence,
        offset: float = 0.0,
        *,
        name: str = "half_space",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        n = as_param(normal, "normal")
        if n.ndim == 0 or not (n != 0).any():
            raise ValueError("normal: expected a non-zero vector or array of the sample shape")
        self._shape = resolve_shape(sample_shape or tuple(n.shape), n.numel(), "sample_shape")
        self._normal = n.reshape(-1)
        b = as_param(offset, "offset")
        if b.ndim != 0:
            raise ValueError(f"offset: expected a scalar, got shape {tuple(b.shape)}")
        self._offset = float(b)
        self._name, self._max_batch = str(name), as_max_batch(max_batch)

    def _params(self) -> tuple[Tensor, ...]:
        return self._normal, torch.tensor([self._offset], dtype=torch.float64)

    def contains(self, x: Tensor) -> Tensor:
        """nᵀx ≤ offset for each ``(n, *S)`` sample, computed in float64; ``(n,)`` bool."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        return flat @ self._normal.to(flat.device) <= self._offset

    @property
    def normal(self) -> Tensor:
        """n, ``(d,)``."""
        return self._normal

    @property
    def offset(self) -> float:
        return self._offset


class Box(_Constraint):
    """C = {x : low ≤ x ≤ high}; bounds broadcast to the sample shape, may be ±inf, low < high."""

    def __init__(
        self,
        low: Tensor | Sequence | float,
        high: Tensor | Sequence | float,
        *,
        name: str = "box",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        lo = as_param(low, "low", allow_inf=True)
        hi = as_param(high, "high", allow_inf=True)
        try:
            shape = torch.broadcast_shapes(lo.shape, hi.shape, tuple(sample_shape or ()))
        except RuntimeError:
            raise ValueError(
                f"high: shapes {tuple(lo.shape)} (low) and {tuple(hi.shape)} (high) do not "
                f"broadcast to one sample shape {tuple(sample_shape or ())}"
            ) from None
        if not shape:
            raise ValueError("sample_shape: scalar bounds need a sample_shape")
        self._shape = resolve_shape(sample_shape or shape, math.prod(shape), "sample_shape")
        self._low = lo.expand(shape).reshape(-1).clone()
        self._high = hi.expand(shape).reshape(-1).clone()
        if not (self._low < self._high).all():
            raise ValueError("high: every bound must exceed low")
        self._name, self._max_batch = str(name), as_max_batch(max_batch)

    def _params(self) -> tuple[Tensor, ...]:
        return self._low, self._high

    def contains(self, x: Tensor) -> Tensor:
        """low ≤ x ≤ high in every coordinate of each ``(n, *S)`` sample; ``(n,)`` bool."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        low, high = self._low.to(flat.device), self._high.to(flat.device)
        return ((flat >= low) & (flat <= high)).all(dim=-1)

    @property
    def low(self) -> Tensor:
        """``(d,)``."""
        return self._low

    @property
    def high(self) -> Tensor:
        """``(d,)``."""
        return self._high
