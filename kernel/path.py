"""The rectified-flow path and its identities, in one place.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``, FLUX, SD3, Wan)::

    x_σ = (1 − σ)·x_0 + σ·ε,   σ: 1 → 0,   model output v ≈ ε − x_0

from which, for a batch with one σ per sample:

    x̂_0            = x_σ − σ·v
    ε̂              = x_σ + (1 − σ)·v
    ∇log p_σ(x_σ)  = −ε̂ / σ = −(x_σ + (1 − σ)·v) / σ = −(x_σ − (1 − σ)·x̂_0) / σ²
    v              = −(x_σ + σ·∇log p_σ) / (1 − σ)          (σ < 1)

Scores add under a product of experts; velocities do not. Every conversion in poegen goes
through these functions. ``sigma`` is a tensor of shape ``(B,)`` (or a scalar) and broadcasts
over the trailing sample dimensions of ``x`` ``(B, *S)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Reshape σ of shape ``(B,)`` or ``()`` to broadcast against ``x`` of shape ``(B, *S)``."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def x0_from_velocity(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """x̂_0 = x_σ − σ·v."""
    return x - per_sample(sigma, x) * v


def noise_from_velocity(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """ε̂ = x_σ + (1 − σ)·v."""
    return x + (1 - per_sample(sigma, x)) * v


def score_from_velocity(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """∇log p_σ(x) = −(x + (1 − σ)·v) / σ; undefined at σ = 0."""
    s = per_sample(sigma, x)
    return -(x + (1 - s) * v) / s


def velocity_from_score(x: Tensor, sigma: Tensor | float, score: Tensor) -> Tensor:
    """v = −(x + σ·∇log p_σ) / (1 − σ); undefined at σ = 1."""
    s = per_sample(sigma, x)
    return -(x + s * score) / (1 - s)


def velocity_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """v = (x_σ − x̂_0) / σ; undefined at σ = 0."""
    return (x - x0) / per_sample(sigma, x)


def noise(x0: Tensor, sigma: Tensor | float, eps: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x_0 + σ·ε."""
    s = per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def euler_step(x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, v: Tensor) -> Tensor:
    """One Euler step of dx/dσ = v from σ to σ_next (σ_next < σ)."""
    return x + (per_sample(sigma_next, x) - per_sample(sigma, x)) * v
