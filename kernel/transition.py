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

**The control drift** (a Stein control variate that is also a better transport). (2) is the
rate for the drift b of (1), but the weights are exact for *any* drift as long as A is the rate
of the drift simulated. Add δb(x) = M x + c (M diagonal, M and c constant over one step): the
rate gains ∇·δb + δb·∇ℓ,

    A_δ = A + tr M + (M x + c)·S                                                (3)

and by Stein's identity ∫ (∇·δb + δb·∇ℓ) e^ℓ = ∫ ∇·(δb e^ℓ) = 0 the added term has mean zero
under π_σ: the rate of log Z is unchanged, only the spread of the weights changes. Each step
picks (M, c) that minimise the empirical variance of A_δ over the particles (least squares on
the features 1 + x⊙S and S, per coordinate, or summed to two scalars m, c when there are
fewer than 8 particles per coordinate). For a product of Gaussians with diagonal covariances
A is a quadratic per coordinate that (3) cancels exactly: δb then completes −V + (g²/2)S into
the exact transport of π_σ and the weights stay equal. That is what keeps the FK weights from
degenerating with the dimension, where coordinates with no separated modes carry most of
their variance (``bench/accuracy.py`` runs the FK transition with and without it); the part of
A that no affine drift absorbs, the masses of separated modes, stays in the weights. The fit uses the same particles it corrects (the adaptive choice usual in SMC
samplers, e.g. adaptive tempering), a bias O(1/N).

**Weights in discrete time.** Over one step [σ, σ'] the increment is the trapezoid
½·(A_δ(x, σ) + A_δ(x', σ'))·(σ − σ'), with the step's δb at both ends, on the particle's own path (the ends of the step, before any
MCMC move: moves at a level keep its target invariant and need no weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CONTROL_PARTICLES_PER_FEATURE = 4  # least squares with fewer particles per feature overfits


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
    control: ControlDrift | None = None,
) -> Tensor:
    """One Euler–Maruyama step of (1) from σ to σ' < σ, with the control drift δb of (3):

        x' = x + Δτ·(−V + δb(x) + (g²/2)·S) + g·√Δτ·ξ,   Δτ = σ − σ'

    with S the summed score (:func:`summed_score`).
    """
    dtau = sigma - sigma_next
    x_next = x - dtau * summed_velocity
    if control is not None:
        x_next = x_next + dtau * control.drift(x)
    if noise == 0:
        return x_next
    g2 = sde_noise_variance(sigma, noise)
    score = summed_score(x, sigma, summed_velocity, total)
    xi = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x_next + (0.5 * g2 * dtau) * score + math.sqrt(g2 * dtau) * xi


def summed_score(x: Tensor, sigma: float, summed_velocity: Tensor, total: Tensor) -> Tensor:
    """S = Σ_i β_i s_i = −(B·x + (1 − σ)·V)/σ, the path identity v_i = −(x + σ s_i)/(1 − σ)
    summed (−B·x at σ = 1)."""
    return -(total * x + (1 - sigma) * summed_velocity) / sigma


@dataclass(frozen=True, slots=True)
class ControlDrift:
    """δb(x) = m ⊙ x + c of (3) for one step: ``m`` and ``c`` of the sample shape (per
    coordinate) or 0-d (the same for every coordinate)."""

    m: Tensor
    c: Tensor

    def drift(self, x: Tensor) -> Tensor:
        """δb(x), shape of ``x``."""
        return self.m * x + self.c

    def rate(self, x: Tensor, score: Tensor) -> Tensor:
        """tr M + (M x + c)·S, the term (3) adds to A, shape ``(N,)`` float64."""
        x, score = _cpu64(x), _cpu64(score)
        m, c = _cpu64(self.m), _cpu64(self.c)
        return (m * (1 + x * score) + c * score).flatten(1).sum(1)


def fit_control_drift(x: Tensor, score: Tensor, rate: Tensor) -> ControlDrift | None:
    """The (m, c) of (3) minimising the empirical variance of A_δ over the particles ``x``
    (``score``: S at them, ``rate``: A at them); per coordinate with enough particles (a
    least-squares fit of 2 features per coordinate), else two scalars; ``None`` when there is
    nothing to fit (equal rates: one expert with β = 1, or a single particle) or the fit fails."""
    n, d = x.shape[0], x[0].numel()
    device, dtype = x.device, x.dtype
    rate = rate.to("cpu", torch.float64)
    if n < 2 * CONTROL_PARTICLES_PER_FEATURE or not bool((rate != rate[0]).any()):
        return None
    x, score = _cpu64(x), _cpu64(score)  # the fit in float64 whatever the particles' dtype
    xs, s = (1 + x * score).flatten(1), score.flatten(1)
    per_coordinate = 2 * d * CONTROL_PARTICLES_PER_FEATURE <= n
    features = torch.cat([xs, s], 1) if per_coordinate else torch.stack([xs.sum(1), s.sum(1)], 1)
    centred = features - features.mean(0)
    gram = centred.T @ centred
    # a ridge far below the features' scale: only keeps constant features solvable
    ridge = 1e-10 * float(gram.diagonal().mean()) + 1e-300
    theta = -torch.linalg.solve(
        gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), centred.T @ (rate - rate.mean())
    )
    if not bool(torch.isfinite(theta).all()):
        return None
    shape = x.shape[1:] if per_coordinate else ()
    k = d if per_coordinate else 1
    m, c = (t.reshape(shape).to(device, dtype) for t in (theta[:k], theta[k:]))
    return ControlDrift(m, c)


def _cpu64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


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
