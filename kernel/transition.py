"""Transitions between noise levels, and the Feynman–Kac weights that make them exact.

Flow path (``poegen.kernel.path``): x_σ = (1 − σ)·x_0 + σ·ε, σ: 1 → 0; write τ = 1 − σ for
the forward time of sampling. The intermediate target of a product of experts with exponents
β_i (per coordinate c: β_i(c) = w_i·m_i(c), B(c) = Σ_i β_i(c)) is

    π_σ(x) ∝ Π_i p_{i,σ}(x)^{β_i},        S = ∇log π_σ = Σ_i β_i ⊙ s_i

where each p_{i,σ} is the expert's own noised marginal and s_i, v_i its score and velocity.

**The FK transition** (Skreta et al., ICML 2025, "Feynman-Kac Correctors in Diffusion",
derived here for this path; ``docs/sampler.md`` has every line). Each p_{i,σ} is carried along τ
by the flow u_i = −v_i: ∂_τ p_i = −∇·(p_i u_i). Simulate

    dx = b dτ + g dW,    b = −V + (g²/2)·S,    V = Σ_i β_i ⊙ v_i            (1)

(Euler on the *summed* velocity plus a Langevin term of any strength g ≥ 0) and carry
log-weights d log w = A dτ. The weighted set targets π_σ at every level iff A solves the
Feynman–Kac PDE for the unnormalised density exp(ℓ), ℓ = Σ_i β_i log p_i:

    A = ∂_τ ℓ + ∇·b + b·∇ℓ − (g²/2)(Δℓ + ‖∇ℓ‖²)

Using the path's identity v_i = −(x + σ s_i)/τ, the divergences of the experts' scores cancel
(that is why b uses S with the factor g²/2 and V with no normalisation) and what remains needs
only the velocities the experts return:

    A = [ (B − 1)·x·V + τ·(‖V‖² − Σ_i β_i‖v_i‖²) ] / σ                       (2)

summed over coordinates with the per-coordinate β_i(c) and B(c). A does not depend on g: g = 0
(the weighted probability-flow ODE) is exact too, g > 0 adds noise that separates resampled
copies. For one expert with β = 1, A = 0 and (1) with g = 0 is the plain Euler step. (2) is
finite at σ = 1 (the first step starts there) and holds for any real β_i with B > 0, so
classifier-free guidance (1 + γ)·cond − γ·uncond is a product like any other. With regions it
is exact when the experts factorise over the regions' blocks; elsewhere it is the natural
per-coordinate rule.

The noise strength is g(σ)² = 2γσ (``sde_noise`` = γ): the flow path's own forward diffusion
g_f² = 2σ/(1 − σ) at small σ, but finite at σ = 1, where g_f would make the first
Euler–Maruyama step of a 50-level grid as large as the target's width.

**Scored constraints** (a tie q_c,σ noised exactly along the path, with its log-density) join
the target as π_σ·Π_c q_c,σ^{w_c}: the step stays (1) for the generative product alone, and the
weight gains w_c·(log q_c,σ'(x') − log q_c,σ(x)); by the same telescoping as the potentials of
``sampler`` the weighted set then targets the whole product at every level, and the MCMC moves,
whose score includes the ties, keep it invariant.

**Weights in discrete time.** Over one step [σ, σ'] the increment is the trapezoid
½·(A(x, σ) + A(x', σ'))·(σ − σ'), on the particle's own path (the ends of the step, before any
MCMC move: moves at a level keep its target invariant and need no weight).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fk_log_rate(
    x: Tensor,
    sigma: float,
    velocities: list[Tensor],
    exponents: list[Tensor | float],
    total: Tensor,
) -> Tensor:
    """A(x, σ) of (2), shape ``(N,)`` float64.

    ``velocities``: each factor's v_i, shape ``(N, *S)``; ``exponents``: β_i of shape S (or a
    scalar); ``total``: B of shape S.
    """
    summed = torch.zeros_like(x)
    energy = torch.zeros_like(x)
    for v, beta in zip(velocities, exponents, strict=True):
        summed = summed + beta * v
        energy = energy + beta * v.square()
    tau = 1.0 - sigma
    rate = ((total - 1) * x * summed + tau * (summed.square() - energy)) / sigma
    return rate.flatten(1).sum(1).to(torch.float64)


def sde_noise_variance(sigma: float, noise: float) -> float:
    """g(σ)² = 2γσ²."""
    return 2.0 * noise * sigma**2


def fk_step(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    summed_velocity: Tensor,
    total: Tensor,
    noise: float,
    *,
    generator: torch.Generator,
) -> Tensor:
    """One Euler–Maruyama step of (1) from σ to σ' < σ:

        x' = x + Δτ·(−V + (g²/2)·S) + g·√Δτ·ξ,   Δτ = σ − σ'

    with S = Σ_i β_i s_i = −(B·x + (1 − σ)·V)/σ, the path identity summed (−B·x at σ = 1).
    """
    dtau = sigma - sigma_next
    x_next = x - dtau * summed_velocity
    if noise == 0:
        return x_next
    g2 = sde_noise_variance(sigma, noise)
    score = -(total * x + (1 - sigma) * summed_velocity) / sigma
    xi = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x_next + (0.5 * g2 * dtau) * score + math.sqrt(g2 * dtau) * xi


def fk_log_increment(rate: Tensor, rate_next: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Trapezoid ½·(A(x, σ) + A(x', σ'))·(σ − σ'), shape ``(N,)`` float64."""
    return 0.5 * (rate + rate_next) * (sigma - sigma_next)


def initial_noise(
    shape: tuple[int, ...], total: Tensor, *, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Exact draws from π_1 = Π_i N(0, I)^{β_i} = N(0, 1/B) per coordinate, shape ``shape``
    (N first), drawn on the CPU. With B = 1 these are the plain ``torch.randn`` draws."""
    eps = torch.randn(shape, generator=generator, dtype=dtype)
    if bool((total == 1).all()):
        return eps
    return eps / total.to("cpu", dtype).sqrt()


def initial_log_normalizer(total: Tensor) -> float:
    """log ∫ Π_i N(x; 0, I)^{β_i} dx = Σ_c [(1 − B_c)/2·log 2π − ½·log B_c]."""
    b = total.to(torch.float64)
    return float(((1 - b) * 0.5 * math.log(2 * math.pi) - 0.5 * b.log()).sum())
