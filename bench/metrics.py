"""Accuracy metrics of a weighted particle set against an exact target.

Every metric takes a particle set ``x`` of shape ``(n, *S)`` (flattened to ``(n, D)``) with
optional normalised log-weights ``log_w`` of shape ``(n,)`` (``None``: equal weights), and
compares it with the exact target through a :class:`Reference`: a large exact sample with
the pieces that do not depend on the method (its energy self-term, its mode fractions, its
moments) computed once.

Energy distance (Székely & Rizzo 2013), between the weighted set (x, W) and the exact
reference y_1 … y_m::

    ED = 2·Σ_ij W_i/m·|x_i − y_j|  −  Σ_ii' W_i·W_i'·|x_i − x_i'|  −  1/(m(m−1))·Σ_{j≠j'} |y_j − y_j'|

The reference self-term is the unbiased U-statistic (y is an i.i.d. exact sample). The
sample side is the weighted **V-statistic** (diagonal included, where it is 0): for fixed
weights and x_i i.i.d. from the target its expectation is Σ_i W_i²·E|Y − Y'|, so ED ≥ 0 up to
the reference's Monte Carlo error, never negative like a full U-statistic, and its floor is
explicit: ``E|Y − Y'|/n`` for n equal weights, ``E|Y − Y'|/ESS`` for Kish's ESS = 1/ΣW².
(A weighted U-statistic would divide the off-diagonal sum by 1 − ΣW²; it is unbiased for fixed
weights but goes negative at the floor, which makes ratios meaningless.) ``noise_floor`` measures
the floor the same way as the metric: an exact sample of the method's size against the same
reference, averaged over repeats.

Other metrics:

* **mode TV**: ½·Σ_k |Ŵ_k − W_k^ref|, Ŵ_k = total weight of the particles whose most
  responsible mode (under the exact target) is k; W^ref the same fractions on the reference
  (mode fractions by max responsibility differ from the mixture weights when modes overlap).
* **mean error**: ‖m̂ − m‖ / √tr(C) (relative to the target's scale; the target mean is often 0).
* **covariance error**: ‖Ĉ − C‖_F / ‖C‖_F.
* **log-Z error**: log Ẑ − log Z (Ẑ unbiased; log Ẑ biased low by about Var(Ẑ/Z)/2).
* **E[r]**: Σ W_i·r(x_i), against the exact E_target[r].
* **violation rate**: Σ_i W_i·1[x_i violates a constraint].
* **expert calls**: per expert, from the kernel's trace; evaluations = calls × particles.

Pairwise distances are computed in row chunks (``chunk_elements`` distances at a time), in
float64 through the matrix-product form, so d = 64, n = 2048 against m = 8192 stays small
and fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # distances held at once (32 MiB in float64)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _probs(log_w: Tensor | None, n: int) -> Tensor:
    """Normalised weights (n,), float64; equal weights when ``log_w`` is None."""
    if log_w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return torch.softmax(log_w.to(torch.float64), 0)


def weighted_distance_sum(
    x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> float:
    """Σ_ij wx_i·wy_j·‖x_i − y_j‖ for x (n, D), y (m, D) float64, chunked over rows of x."""
    rows = max(1, chunk_elements // max(1, y.shape[0]))
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, x.shape[0], rows):
        d = torch.cdist(x[lo : lo + rows], y)  # matrix-product form; float64 keeps it exact
        total += wx[lo : lo + rows] @ (d @ wy)
    return float(total)


def energy_distance(
    x: Tensor,
    y: Tensor,
    log_wx: Tensor | None = None,
    log_wy: Tensor | None = None,
    *,
    statistic: str = "v",
) -> float:
    """Energy distance between two (weighted) sets, shapes ``(n, *S)`` and ``(m, *S)``.

    ``statistic="v"``: weighted V-statistic on both sides (≥ 0). ``"u"``: both self-terms as
    off-diagonal sums over 1 − ΣW² (the U-statistic for equal weights; unbiased, may be < 0).
    """
    if statistic not in ("u", "v"):
        raise ValueError(f"statistic: 'u' or 'v', got {statistic!r}")
    x, y = _flat(x), _flat(y)
    wx, wy = _probs(log_wx, x.shape[0]), _probs(log_wy, y.shape[0])
    cross = weighted_distance_sum(x, y, wx, wy)
    xx = weighted_distance_sum(x, x, wx, wx)
    yy = weighted_distance_sum(y, y, wy, wy)
    if statistic == "u":
        xx /= 1 - float(wx.square().sum())
        yy /= 1 - float(wy.square().sum())
    return 2 * cross - xx - yy


@dataclass(frozen=True, slots=True)
class Floor:
    """A metric's value for exact samples of a given size: mean and standard deviation."""

    mean: float
    std: float


class Reference:
    """An exact sample of the target with the method-independent terms precomputed.

    Args:
        samples: exact draws, shape ``(m, *S)``.
        modes: maps a batch ``(B, *S)`` to the index of its most responsible mode ``(B,)``
            (int64 in ``[0, num_modes)``); ``None`` skips the mode metrics.
        num_modes: number of modes.
        sampler: ``sampler(n, generator) -> (n, *S)`` fresh exact draws (for noise floors).
    """

    def __init__(
        self,
        samples: Tensor,
        *,
        modes: Callable[[Tensor], Tensor] | None = None,
        num_modes: int = 0,
        sampler: Callable[[int, torch.Generator], Tensor] | None = None,
    ) -> None:
        self.samples = samples
        self.flat = _flat(samples)
        m = self.flat.shape[0]
        w = torch.full((m,), 1.0 / m, dtype=torch.float64)
        # U-statistic: the diagonal is 0, so rescale the V-sum by m/(m−1)
        self.self_term = weighted_distance_sum(self.flat, self.flat, w, w) * m / (m - 1)
        self.mean = self.flat.mean(0)
        self.cov = torch.cov(self.flat.T).reshape(self.flat.shape[1], -1)
        self.modes = modes
        self.num_modes = num_modes
        self.mode_weights = (
            mode_weights(modes(samples), None, num_modes) if modes is not None else None
        )
        self.sampler = sampler

    def energy_distance(self, x: Tensor, log_w: Tensor | None = None) -> float:
        """ED of the weighted set against this reference (V on the set, U on the reference)."""
        x = _flat(x)
        wx = _probs(log_w, x.shape[0])
        m = self.flat.shape[0]
        wy = torch.full((m,), 1.0 / m, dtype=torch.float64)
        cross = weighted_distance_sum(x, self.flat, wx, wy)
        return 2 * cross - weighted_distance_sum(x, x, wx, wx) - self.self_term

    def mode_tv(self, x: Tensor, log_w: Tensor | None = None) -> float:
        """½·Σ_k |Ŵ_k − W_k^ref| over modes assigned by max responsibility."""
        if self.modes is None or self.mode_weights is None:
            return math.nan
        got = mode_weights(self.modes(x), log_w, self.num_modes)
        return 0.5 * float((got - self.mode_weights).abs().sum())

    def mode_mass_error(self, x: Tensor, log_w: Tensor | None = None) -> float:
        """max_k |Ŵ_k − W_k^ref|: the worst per-mode mass error."""
        if self.modes is None or self.mode_weights is None:
            return math.nan
        got = mode_weights(self.modes(x), log_w, self.num_modes)
        return float((got - self.mode_weights).abs().max())

    def noise_floor(self, n: int, *, repeats: int, generator: torch.Generator) -> dict[str, Floor]:
        """ED and mode TV of ``repeats`` fresh exact sets of size n against this reference."""
        if self.sampler is None:
            raise ValueError("sampler: a Reference needs a sampler to measure noise floors")
        eds, tvs = [], []
        for _ in range(repeats):
            fresh = self.sampler(n, generator)
            eds.append(self.energy_distance(fresh))
            tvs.append(self.mode_tv(fresh))
        return {"energy_distance": _floor(eds), "mode_tv": _floor(tvs)}


def _floor(values: list[float]) -> Floor:
    t = torch.tensor(values, dtype=torch.float64)
    return Floor(float(t.mean()), float(t.std()) if len(values) > 1 else 0.0)


def mode_weights(labels: Tensor, log_w: Tensor | None, num_modes: int) -> Tensor:
    """Total weight per mode (num_modes,) of particles with the given mode labels (n,)."""
    w = _probs(log_w, labels.shape[0])
    return torch.zeros(num_modes, dtype=torch.float64).index_add_(0, labels.long(), w)


def mean_error(x: Tensor, log_w: Tensor | None, mean: Tensor, cov: Tensor) -> float:
    """‖Σ W_i x_i − m‖ / √tr(C)."""
    x = _flat(x)
    w = _probs(log_w, x.shape[0])
    return float((w @ x - mean.to(torch.float64)).norm() / cov.to(torch.float64).trace().sqrt())


def weighted_cov(x: Tensor, log_w: Tensor | None) -> Tensor:
    """Σ W_i (x_i − m̂)(x_i − m̂)ᵀ (the weighted plug-in covariance), (D, D)."""
    x = _flat(x)
    w = _probs(log_w, x.shape[0])
    centred = x - w @ x
    return (centred * w[:, None]).T @ centred


def cov_error(x: Tensor, log_w: Tensor | None, cov: Tensor) -> float:
    """‖Ĉ − C‖_F / ‖C‖_F."""
    cov = cov.to(torch.float64)
    return float((weighted_cov(x, log_w) - cov).norm() / cov.norm())


def weighted_mean(values: Tensor, log_w: Tensor | None) -> float:
    """Σ W_i·values_i (values (n,))."""
    values = values.to(torch.float64)
    return float(_probs(log_w, values.shape[0]) @ values)


def violation_rate(log_potential: Tensor, log_w: Tensor | None) -> float:
    """Σ W_i·1[log_potential_i = −inf]: the weight on particles outside a constraint."""
    return weighted_mean(torch.isneginf(log_potential).to(torch.float64), log_w)


def kish_ess(log_w: Tensor | None, n: int) -> float:
    """1/Σ W_i² (n for equal weights)."""
    if log_w is None:
        return float(n)
    return float(1.0 / _probs(log_w, n).square().sum())


def expert_calls(trace: tuple) -> dict[str, dict[str, int]]:
    """Per expert: batched calls and evaluated samples summed over the trace (right also when
    calls are chunked by ``max_batch``)."""
    calls: dict[str, int] = {}
    evaluations: dict[str, int] = {}
    for level in trace:
        stats: Mapping = level.experts
        for name, s in stats.items():
            calls[name] = calls.get(name, 0) + s.calls
            evaluations[name] = evaluations.get(name, 0) + s.samples
    return {name: {"calls": calls[name], "evaluations": evaluations[name]} for name in calls}
