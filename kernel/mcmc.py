"""MCMC kernels that leave the intermediate product π_σ(x) ∝ Π_i p_{i,σ}(x)^{w_i} invariant.

Each kernel is a pure function ``step(x, state, target, eta, *, generator) -> (x', state',
accepted)`` on a batch of particles ``x`` of shape ``(N, *S)``; decisions are per particle.
``target`` evaluates the product at the current level: ``target(x) -> TargetEval`` with the
summed score (always) and the summed log-density (when every generative expert gives one).

* **ULA** (default; Roberts & Tweedie 1996): x' = x + η·∇log π(x) + √(2η)·ξ. Unadjusted: its
  bias is O(η), the price of needing only velocities.
* **MALA**: the ULA proposal, accepted with probability
  min(1, π(x')q(x|x') / π(x)q(x'|x)), q(x'|x) = N(x'; x + η∇log π(x), 2η·I). (R3's code divides
  by 2η² and decides once for the whole batch; both are wrong.)
* **HMC** (Neal 2011): L leapfrog steps of size ε = √(2η) with unit mass, then a per-particle
  accept on the Hamiltonian H = −log π(x) + ½‖p‖². One leapfrog step is MALA.
* **UHMC**: unadjusted HMC with partial momentum refreshment p ← ρ·p + √(1 − ρ²)·ξ and no
  accept test (R3's AnnealedUHA); the momentum persists across the level's steps.

**Potential stage** (delayed acceptance, Christen & Fox 2005): when the level's target is
π_σ·exp(φ) with a potential φ that has no gradient (rewards, constraints on x̂_0), a move from
any of the kernels above is accepted a second time with probability min(1, exp(φ(x') − φ(x))),
see :func:`potential_stage`. If the move is π_σ-reversible (MALA, HMC) the result is exactly
π_σ·exp(φ)-invariant; after ULA or UHMC it inherits their O(η) bias.

Step size η per level comes from :func:`step_size`: ``sigma2`` (default) η = c·σ²/W_max,
``constant`` η = c.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class TargetEval:
    """The product at one level, evaluated at a batch.

    Attributes:
        score: Σ_i w_i·m_i ⊙ ∇log p_{i,σ}(x), shape ``(N, *S)``; ``None`` when no move will
            read it (a run without MCMC steps).
        log_prob: Σ_i w_i·log p_{i,σ}(x), shape ``(N,)``, or ``None`` when unavailable.
        velocity: the weight-normalised combined velocity at x (reused by the sampler for x̂_0
            and the next transition), shape ``(N, *S)``.
        log_rate: the Feynman–Kac rate A(x, σ) of the FK transition
            (``poegen.kernel.transition``), shape ``(N,)`` float64; ``None`` under Euler.
        tie_log_prob: Σ_c w_c·log q_c,σ(x) of the scored constraints under FK, shape ``(N,)``
            float64; ``None`` otherwise.
    """

    score: Tensor | None
    log_prob: Tensor | None
    velocity: Tensor
    log_rate: Tensor | None = None
    tie_log_prob: Tensor | None = None

    def take(self, idx: Tensor) -> TargetEval:
        """The evaluation at the particles ``idx`` (after resampling)."""
        return TargetEval(*(None if t is None else t[idx] for t in self._fields()))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.score, self.log_prob, self.velocity, self.log_rate, self.tie_log_prob)


Target = Callable[[Tensor], TargetEval]


@dataclass(frozen=True, slots=True)
class Momentum:
    """UHMC's momentum, carried across the steps of one level, shape ``(N, *S)``."""

    p: Tensor


def step_size(rule: str, scale: float, sigma: float, max_weight: float) -> float:
    """η at level σ: ``sigma2`` → c·σ²/W_max (R3 scales by β_t), ``constant`` → c."""
    if rule == "sigma2":
        return scale * sigma**2 / max_weight
    return scale


def _noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal draws from the kernel's CPU generator, moved to ``like``'s device."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def _uniform(n: int, like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=like.dtype).to(like.device)


def _sum_sq(t: Tensor) -> Tensor:
    return t.flatten(1).square().sum(1)


def metropolis(log_ratio: Tensor, like: Tensor, generator: torch.Generator) -> Tensor:
    """Per-particle MH decision: accept with probability min(1, exp(log_ratio)); NaN rejects."""
    u = _uniform(log_ratio.numel(), like, generator)
    return torch.log(u) < torch.nan_to_num(log_ratio, nan=-torch.inf)


def select(accept: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per particle: ``new`` where accepted, else ``old``."""
    return torch.where(accept.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def ula(
    x: Tensor, here: TargetEval, target: Target, eta: float, *, generator: torch.Generator
) -> tuple[Tensor, TargetEval, None]:
    """x' = x + η·∇log π(x) + √(2η)·ξ."""
    x_new = x + eta * here.score + math.sqrt(2 * eta) * _noise(x, generator)
    return x_new, target(x_new), None


def mala(
    x: Tensor, here: TargetEval, target: Target, eta: float, *, generator: torch.Generator
) -> tuple[Tensor, TargetEval, Tensor]:
    """ULA proposal + per-particle MH test; q(x'|x) = N(x + η∇log π(x), 2η·I)."""
    proposal = x + eta * here.score + math.sqrt(2 * eta) * _noise(x, generator)
    there = target(proposal)
    forward = -_sum_sq(proposal - x - eta * here.score) / (4 * eta)
    backward = -_sum_sq(x - proposal - eta * there.score) / (4 * eta)
    log_ratio = there.log_prob - here.log_prob + backward - forward
    accept = metropolis(log_ratio, x, generator)
    return select(accept, proposal, x), select_eval(accept, there, here), accept


def hmc(
    x: Tensor,
    here: TargetEval,
    target: Target,
    eta: float,
    *,
    generator: torch.Generator,
    leapfrog_steps: int,
) -> tuple[Tensor, TargetEval, Tensor]:
    """L leapfrog steps of size ε = √(2η), then a per-particle accept on H = −log π + ½‖p‖²."""
    p0 = _noise(x, generator)
    x_new, p_new, there = _leapfrog(x, p0, here, target, math.sqrt(2 * eta), leapfrog_steps)
    log_ratio = (there.log_prob - 0.5 * _sum_sq(p_new)) - (here.log_prob - 0.5 * _sum_sq(p0))
    accept = metropolis(log_ratio, x, generator)
    return select(accept, x_new, x), select_eval(accept, there, here), accept


def uhmc(
    x: Tensor,
    here: TargetEval,
    target: Target,
    eta: float,
    *,
    generator: torch.Generator,
    leapfrog_steps: int,
    damping: float,
    momentum: Momentum | None,
) -> tuple[Tensor, TargetEval, Momentum]:
    """Partial refresh p ← ρ·p + √(1 − ρ²)·ξ, then L leapfrog steps, no accept test."""
    xi = _noise(x, generator)
    p = xi if momentum is None else damping * momentum.p + math.sqrt(1 - damping**2) * xi
    x_new, p_new, there = _leapfrog(x, p, here, target, math.sqrt(2 * eta), leapfrog_steps)
    return x_new, there, Momentum(p_new)


def _leapfrog(
    x: Tensor, p: Tensor, here: TargetEval, target: Target, eps: float, steps: int
) -> tuple[Tensor, Tensor, TargetEval]:
    """Störmer–Verlet: half kick, (drift, kick)×L with the last kick halved."""
    evaluation = here
    p = p + 0.5 * eps * evaluation.score
    for i in range(steps):
        x = x + eps * p
        evaluation = target(x)
        p = p + (eps if i < steps - 1 else 0.5 * eps) * evaluation.score
    return x, p, evaluation


def select_eval(accept: Tensor, new: TargetEval, old: TargetEval) -> TargetEval:
    """Per particle: the evaluation at the accepted state."""

    def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None:
            return None
        return select(accept.to(a.device), a, b)

    return TargetEval(*(pick(a, b) for a, b in zip(new._fields(), old._fields(), strict=True)))


def potential_stage(
    x: Tensor,
    here: TargetEval,
    phi: Tensor,
    x_new: Tensor,
    there: TargetEval,
    phi_new: Tensor,
    *,
    generator: torch.Generator,
) -> tuple[Tensor, TargetEval, Tensor, Tensor]:
    """Accept each moved particle with probability min(1, exp(φ(x') − φ(x))).

    ``phi`` and ``phi_new`` are ``(N,)`` float64 potentials (−inf allowed: a move into −inf is
    rejected, a move out of it accepted). Returns (x, evaluation, φ, accepted).
    """
    log_ratio = torch.where(torch.isneginf(phi) & ~torch.isneginf(phi_new), 0.0, phi_new - phi)
    accept = metropolis(log_ratio.to(device=x.device, dtype=x.dtype), x, generator)
    phi = torch.where(accept.to(phi.device), phi_new, phi)
    return select(accept, x_new, x), select_eval(accept, there, here), phi, accept
