"""The potentials of one level: φ_k = s_k·Σ_j λ_j r_j(x̂_0) + Σ_c w_c·log C_c(x̂_0).

Discriminative experts' log-potentials are scaled by λ_j and the tempering scale s_k (applied by
the caller); constraints' by their weight, with a violated hard constraint (−inf) costing
−``penalty`` before the last level and −inf at it. Pixel-input experts see decoded pixels,
decoded once per evaluation and shared (:func:`potential_values`). :func:`check_alive` names
the factor that killed the last particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from poegen.kernel.calls import Call, ExpertCalls
from poegen.kernel.experts import ExpertKind
from poegen.kernel.problem import PixelSource, Problem
from poegen.kernel.spec import SamplerSettings


class AllParticlesDiedError(RuntimeError):
    """Every particle got zero weight at one level."""


Potential = Callable[[Tensor], Tensor]  # x̂_0 (N, *S) → φ (N,) float64 at one level


def level_potential(
    problem: Problem, calls: ExpertCalls, penalty: float, scale: float
) -> Potential:
    """φ_k(x̂_0) = s_k·Σ_j λ_j r_j(x̂_0) + constraint terms, for the potential stage."""

    def phi(x0: Tensor) -> Tensor:
        rewards, constraints = evaluate_potentials(problem, calls, x0, penalty)
        return scale * rewards + constraints

    return phi


def violation_cost(settings: SamplerSettings, k: int, num_levels: int) -> float:
    """What a violated hard constraint costs at level k: −inf at the last level only."""
    if k == num_levels - 1:
        return math.inf
    return settings.constraint_penalty * (k + 1) / num_levels


def evaluate_potentials(
    problem: Problem, calls: ExpertCalls, x0: Tensor, penalty: float
) -> tuple[Tensor, Tensor]:
    """(Σ_j λ_j·r_j(x̂_0), Σ_c w_c·log C_c(x̂_0)), each ``(N,)`` float64; a violated hard
    constraint (−inf) counts −``penalty``."""
    n = x0.shape[0]
    rewards = torch.zeros(n, dtype=torch.float64)
    constraints = torch.zeros(n, dtype=torch.float64)
    for b, value in zip(problem.potentials, potential_values(problem, calls, x0), strict=True):
        value = value.detach().to("cpu", torch.float64)  # NaN and +inf: refused by the calls
        if b.info.kind == ExpertKind.DISCRIMINATIVE:
            rewards += b.factor.weight * value
        else:
            violated = torch.full_like(value, -penalty)
            constraints += torch.where(torch.isneginf(value), violated, b.factor.weight * value)
    return rewards, constraints


def potential_values(problem: Problem, calls: ExpertCalls, x0: Tensor) -> list[Tensor]:
    """Each potential's ``log_potential``, in factor order: of x̂_0, or for pixel-input
    experts of its pixels, decoded once and shared by all of them."""
    pixels = None if problem.pixels is None else _decode_pixels(problem.pixels, calls, x0)
    jobs = [
        Call(b, "log_potential", pixels if b.info.pixel_input else x0, per_sample_output=True)
        for b in problem.potentials
    ]
    return calls.run(jobs)


def _decode_pixels(source: PixelSource, calls: ExpertCalls, x0: Tensor) -> Tensor:
    """pixels = clamp((D(x̂_0) + 1)/2, 0, 1), D the decoder ([-1, 1] out; identity in pixel
    space), shape (N, C, H, W) or (N, C, F, H, W)."""
    decoded = x0
    if source.decoder is not None:
        decoded = calls.run([Call(source.decoder, "decode", x0, any_sample_shape=True)])[0]
        if decoded.ndim not in (4, 5) or not torch.isfinite(decoded).all():
            raise ValueError(
                f"expert {source.decoder.name!r}: decode() returned shape {tuple(decoded.shape)} "
                "or non-finite pixels; expected finite (N, C, H, W) or (N, C, F, H, W)"
            )
    return ((decoded + 1) / 2).clamp(0, 1)


def check_alive(
    problem: Problem, calls: ExpertCalls, log_w: Tensor, x0: Tensor, step: int, sigma: float
) -> None:
    """Raise naming the level and the factor that killed the last particles."""
    if not torch.isneginf(log_w).all():
        return
    deaths = {
        b.name: int(torch.isneginf(v).sum())
        for b, v in zip(problem.potentials, potential_values(problem, calls, x0), strict=True)
    }
    culprits = [name for name, d in sorted(deaths.items(), key=lambda kv: -kv[1]) if d > 0]
    detail = ", ".join(f"{name!r} ({deaths[name]} of {x0.shape[0]})" for name in culprits)
    raise AllParticlesDiedError(
        f"every particle has zero weight at level {step} (sigma={sigma:.4g}); "
        f"violated by: {detail or 'no single factor (weights underflowed)'}"
    )
