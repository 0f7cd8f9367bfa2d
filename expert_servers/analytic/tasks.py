"""Ready-made experts for the synthetic benchmark (docs: ``shared/algorithm-anchors.md`` (c)).

* ``ring_of_gaussians``, ``bar``: R3's 2-D composition task (Du et al. 2023, "Reduce, Reuse,
  Recycle", toy notebook): a ring of 8 Gaussians (radius 0.5, std 0.03) times a bar (uniform on
  x ∈ [−0.2, 0.2], y ∈ [−1, 1]). The bar is represented here by the single Gaussian with the
  same mean and covariance (variance L²/12 along each side L), so that the product is exact.
* ``grid_of_gaussians``, ``das_grid_task``, ``das_ring_task``: DAS's toy targets (Kim, Kim &
  Park, ICLR 2025; krafton-ai/DAS, ``notebooks/GMM.ipynb`` and ``GMM2.ipynb``): equal-weight
  mixtures with covariance 0.3·I, tilted by a quadratic reward with α = 1, i.e. the target
  p(x)·exp(r(x)). Grid: means {−4, 0, 4}², r = −x₁²/100 − x₂². Ring: 8 means at radius 4 and
  angles kπ/4, r = −x₁² − (x₂ − 1)²/10. The closed-form E_target[r] is −0.29072 (grid) and
  −1.34004 (ring); the notebooks print −0.2916 and −1.3366 from 10⁴ draws on a 1000² grid.
"""

from __future__ import annotations

import math

import torch

from poegen.expert_servers.analytic.mixture import GaussianMixture
from poegen.expert_servers.analytic.rewards import QuadraticReward

F64 = torch.float64


def ring_of_gaussians(
    n: int = 8,
    radius: float = 0.5,
    std: float = 0.03,
    *,
    phase: float = 0.0,
    name: str = "ring",
) -> GaussianMixture:
    """n equal-weight isotropic Gaussians at angles phase + 2πk/n on a circle (R3's defaults)."""
    if n < 1:
        raise ValueError(f"n: must be positive, got {n}")
    angles = phase + 2 * math.pi * torch.arange(n, dtype=F64) / n
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=-1)
    return GaussianMixture(means, torch.full((n, 2), std**2, dtype=F64), torch.ones(n), name=name)


def grid_of_gaussians(
    n: int = 3,
    spacing: float = 4.0,
    std: float = math.sqrt(0.3),
    *,
    name: str = "grid",
) -> GaussianMixture:
    """n × n equal-weight isotropic Gaussians on a square grid centred at 0 (DAS's defaults).

    Components run row by row from the top left, as in the DAS notebook.
    """
    if n < 1:
        raise ValueError(f"n: must be positive, got {n}")
    ticks = spacing * (torch.arange(n, dtype=F64) - (n - 1) / 2)
    ys, xs = torch.meshgrid(ticks.flip(0), ticks, indexing="ij")
    means = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    k = n * n
    return GaussianMixture(means, torch.full((k, 2), std**2, dtype=F64), torch.ones(k), name=name)


def bar(
    width: float = 0.4,
    length: float = 2.0,
    *,
    center: tuple[float, float] = (0.0, 0.0),
    angle: float = math.pi / 2,
    name: str = "bar",
) -> GaussianMixture:
    """The moment-matched Gaussian of the uniform law on a width × length rectangle.

    Its long side points at ``angle`` from the x-axis (default: vertical, R3's bar); the
    covariance is R diag(length²/12, width²/12) Rᵀ.
    """
    if not (width > 0 and length > 0):
        raise ValueError("width: width and length must be positive")
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
    cov = rot @ torch.diag(torch.tensor([length**2, width**2], dtype=F64) / 12) @ rot.T
    return GaussianMixture([list(center)], cov[None], [1.0], name=name)


def das_grid_task() -> tuple[GaussianMixture, QuadraticReward]:
    """DAS's 9-mode grid prior and its reward r = −x₁²/100 − x₂² (weight λ = 1/α = 1)."""
    prior = grid_of_gaussians(3, 4.0, math.sqrt(0.3), name="das_grid")
    return prior, QuadraticReward([0.02, 2.0], name="das_grid_reward")


def das_ring_task() -> tuple[GaussianMixture, QuadraticReward]:
    """DAS's 8-mode ring prior and its reward r = −x₁² − (x₂ − 1)²/10 (weight λ = 1/α = 1)."""
    prior = ring_of_gaussians(8, 4.0, math.sqrt(0.3), name="das_ring")
    return prior, QuadraticReward([2.0, 0.2], center=[0.0, 1.0], name="das_ring_reward")
