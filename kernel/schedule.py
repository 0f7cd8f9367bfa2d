"""Noise grids and reward-tempering schedules.

Noise grids are decreasing tensors σ_0 = 1 > σ_1 > … > σ_K ≥ 0 of ``num_steps + 1`` levels:

* ``linear``: σ_k = 1 − k/K.
* ``shifted``: FLUX/SD3's time shift of the linear grid, σ' = s·σ / (1 + (s − 1)·σ); s > 1
  spends more levels at high noise.
* an explicit list (validated by :class:`~poegen.kernel.spec.SamplerSettings`);
* ``expert``: the grid a generative expert computes with its own scheduler code
  (``schedule(num_steps, sample_shape)``, e.g. FLUX's resolution-dependent shift), checked by
  :func:`checked_grid` like an explicit list.

Reward tempering scales λ_k ∈ [0, 1] multiply the discriminative log-potentials at the
positive levels σ_1 … σ_L (L ≤ K); the last one is always 1, which makes the terminal target
exact (the incremental potentials telescope to exp(λ_L · r) = exp(r)):

* ``constant``: λ_k = 1 (FK steering's "diff" potential).
* ``linear``: λ_k = k / L.
* ``exponential``: λ_k = min((1 + γ)^k − 1, 1) (DAS's schedule), last forced to 1.
* ``adaptive``: chosen online by :func:`adaptive_scale`, bisection on the ESS as in particles'
  adaptive tempering; last forced to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from poegen.kernel.experts import KernelError
from poegen.kernel.particles import ess_fraction
from poegen.kernel.spec import SamplerSettings


def linear_sigmas(num_steps: int) -> Tensor:
    """σ_k = 1 − k/K, k = 0 … K."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """FLUX's time shift of the linear grid: σ' = s·σ / (1 + (s − 1)·σ)."""
    sigma = linear_sigmas(num_steps)
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigmas_for(settings: SamplerSettings) -> Tensor:
    """The noise grid the settings ask for, float64, from 1 toward 0 (not ``"expert"``)."""
    if settings.sigmas is not None:
        return torch.tensor(settings.sigmas, dtype=torch.float64)
    if settings.schedule == "linear":
        return linear_sigmas(settings.num_steps)
    if settings.schedule == "shifted":
        return shifted_sigmas(settings.num_steps, settings.shift)
    raise KernelError("schedule", "'expert' takes its grid from an expert (see checked_grid)")


def checked_grid(levels: Sequence[float], num_steps: int, source: str) -> Tensor:
    """An expert's grid as float64, refused unless it has ``num_steps + 1`` finite levels
    decreasing strictly from 1 to a last level in [0, 1)."""
    grid = torch.as_tensor([float(s) for s in levels], dtype=torch.float64)
    if grid.numel() != num_steps + 1:
        raise KernelError(
            "schedule",
            f"{source} gave {grid.numel()} levels for num_steps={num_steps}, "
            f"expected {num_steps + 1}",
        )
    if not bool(torch.isfinite(grid).all()) or grid[0] != 1 or not 0 <= grid[-1] < 1:
        raise KernelError("schedule", f"{source} gave a grid that does not run from 1 into [0, 1)")
    if bool((grid[1:] >= grid[:-1]).any()):
        raise KernelError("schedule", f"{source} gave a grid that is not strictly decreasing")
    return grid


def reward_scales(settings: SamplerSettings, num_levels: int) -> Tensor:
    """λ_1 … λ_L for the fixed schedules (adaptive: λ is chosen online; returns NaN)."""
    k = torch.arange(1, num_levels + 1, dtype=torch.float64)
    match settings.tempering:
        case "constant":
            scales = torch.ones_like(k)
        case "linear":
            scales = k / num_levels
        case "exponential":
            scales = ((1 + settings.tempering_rate) ** k - 1).clamp(max=1.0)
        case "adaptive":
            scales = torch.full_like(k, float("nan"))
    scales[-1] = 1.0
    return scales


def adaptive_scale(
    log_w_at: Callable[[float], Tensor],
    scale_prev: float,
    target_ess: float,
    *,
    iterations: int = 40,
) -> float:
    """The largest s ∈ [s_prev, 1] whose reweighted ESS/N stays ≥ ``target_ess``.

    ``log_w_at(s)`` gives the log-weights after reweighting at scale s. Bisection, as
    particles' adaptive tempering (Jasra et al. 2011); if even s_prev falls below the target,
    s_prev is kept (s never decreases) and resampling restores the ESS.
    """

    def ess_at(s: float) -> float:
        return ess_fraction(log_w_at(s))

    if ess_at(1.0) >= target_ess:
        return 1.0
    if ess_at(scale_prev) < target_ess:
        return scale_prev
    low, high = scale_prev, 1.0
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if ess_at(mid) >= target_ess else (low, mid)
    return low
