"""Exact targets: closed-form laws that a sampler's output is measured against.

Every target answers the ``ExactTarget`` protocol:

    sample(n, generator) -> (n, *S)    exact i.i.d. draws (float64, on the generator's device)
    log_prob(x)          -> (n,)       normalised log-density of the target
    log_normalizer       -> ()         log Z of the unnormalised product (see ``closed_form``)
    mean -> S, covariance -> (d, d)    moments (covariance over the flattened coordinates)
    component_weights    -> (K,)       mass of each mode under the target
    assign(x)            -> (n,)       index of each sample's most responsible mode

Three kinds, from the base case to the non-conjugate ones:

* ``GaussianMixtureTarget``: a Gaussian mixture (products, linear and quadratic tilts).
* ``ProjectedTiltTarget``: a Gaussian mixture times exp(t(aᵀx)) for a 1-D log-tilt t, exact
  because, per component, u = aᵀx ~ N(m_k, s_k²) and x | u is Gaussian:

      x | u, k = μ_k + Σ_k a (u − m_k)/s_k² + (Gaussian orthogonal part, independent of t)

  so only the 1-D law of u changes: a half-line u ≤ b (``HalfSpace``: masses log Φ, draws by
  tail-safe inverse CDF) or a sigmoid tilt λ log σ(k(u − b)) (``SigmoidReward``: masses and
  moments by trapezoidal quadrature on a fine grid, draws by inverting the grid's CDF).
* ``BoxTarget``: a diagonal Gaussian mixture restricted to a box: coordinates are independent
  per component, so masses are products of Φ differences and draws are 1-D truncated normals.

A mode is a mixture component of the Gaussian-mixture target before truncation or sigmoid
tilt; those factors keep the same modes and change their weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from poegen.expert_servers.analytic._checks import flat_batch
from poegen.expert_servers.analytic.mixture import GaussianMixture, mixture_covariance
from poegen.expert_servers.analytic.normal import (
    log_ndtr_diff,
    open_uniform,
    truncnorm_moments,
    truncnorm_sample,
)
from poegen.expert_servers.analytic.rewards import LinearReward, QuadraticReward, SigmoidReward

F64 = torch.float64


@runtime_checkable
class ExactTarget(Protocol):
    """What the benchmark needs from an exact target (see the module docstring)."""

    @property
    def sample_shape(self) -> tuple[int, ...]: ...
    @property
    def log_normalizer(self) -> Tensor: ...
    @property
    def mean(self) -> Tensor: ...
    @property
    def covariance(self) -> Tensor: ...
    @property
    def component_weights(self) -> Tensor: ...
    def sample(self, n: int, generator: torch.Generator) -> Tensor: ...
    def log_prob(self, x: Tensor) -> Tensor: ...
    def assign(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class GaussianMixtureTarget:
    """A Gaussian-mixture target: ``mixture`` (normalised) and log Z of the product it came from.

    ``mixture`` is itself a generative expert: the oracle for this target.
    """

    mixture: GaussianMixture
    log_normalizer: Tensor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.mixture.sample_shape

    @property
    def mean(self) -> Tensor:
        return self.mixture.mean

    @property
    def covariance(self) -> Tensor:
        return self.mixture.covariance

    @property
    def component_weights(self) -> Tensor:
        return self.mixture.weights

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mixture.sample(n, generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Clean log-density, ``(n,)``."""
        return self.mixture.log_prob(x, 0.0)

    def assign(self, x: Tensor) -> Tensor:
        return self.mixture.assign(x)

    def noised(self, sigma: float) -> GaussianMixture:
        """The ideal intermediate: the law of x_σ = (1 − σ)x₀ + σε for x₀ from this target."""
        return self.mixture.noised(sigma)


# --- 1-D tilts along a direction -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HalfLine:
    """t(u) = 0 for u ≤ offset, −inf above: the projection of ``HalfSpace``."""

    offset: float

    def log_potential(self, u: Tensor) -> Tensor:
        return torch.where(u <= self.offset, 0.0, -math.inf).to(u.dtype)

    def log_mass(self, m: Tensor, s: Tensor) -> Tensor:
        """log P(u ≤ b) = log Φ((b − m)/s)."""
        return torch.special.log_ndtr((self.offset - m) / s)

    def moments(self, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of u ~ N(m, s²) given u ≤ b."""
        beta = (self.offset - m) / s
        mean, var = truncnorm_moments(torch.full_like(beta, -math.inf), beta)
        return m + s * mean, s * s * var

    def sample(self, m: Tensor, s: Tensor, index: Tensor, generator: torch.Generator) -> Tensor:
        """u ~ N(m_k, s_k²) given u ≤ b, for the component ``index`` of each draw."""
        m, s = m[index], s[index]
        beta = (self.offset - m) / s
        z = truncnorm_sample(torch.full_like(beta, -math.inf), beta, _uniform(index, generator))
        return (m + s * z).clamp(max=self.offset)


@dataclass(frozen=True, slots=True)
class SigmoidTilt:
    """t(u) = λ·log σ(k(u − b)), integrated on a per-component grid.

    Grid for N(m, s²)·e^{t}: the tilt's slope lies in λ·[0, k], so the mode lies within
    [m + min(0, λks²), m + max(0, λks²)]; for λ > 0 it also stays below about max(m, b) + 12s.
    The grid spans that interval ± 12s with spacing min(s, 1/k)/32 (at most 2¹⁵ + 1 points);
    the trapezoidal rule is spectrally accurate there. A grid whose ends carry more than e⁻⁴⁰
    of the peak raises ``NotImplementedError``.
    """

    offset: float
    sharpness: float
    weight: float
    max_points: int = 2**15 + 1

    def log_potential(self, u: Tensor) -> Tensor:
        return self.weight * F.logsigmoid(self.sharpness * (u - self.offset))

    def grid(self, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nodes ``(K, n)``, log-integrand log N(u; m, s²) + t(u) ``(K, n)``, spacing ``(K,)``."""
        push = self.weight * self.sharpness * s * s
        if self.weight > 0:
            push = torch.minimum(push, (self.offset - m).clamp_min(0) + 12 * s)
        lo, hi = m + push.clamp(max=0) - 12 * s, m + push.clamp(min=0) + 12 * s
        step = torch.clamp(s, max=1 / self.sharpness) / 32
        n = int(min(self.max_points, max(257, math.ceil(((hi - lo) / step).max().item()) + 1)))
        t = torch.linspace(0, 1, n, dtype=m.dtype, device=m.device)
        u = lo[:, None] + (hi - lo)[:, None] * t
        z = (u - m[:, None]) / s[:, None]
        log_q = -0.5 * z * z - torch.log(s)[:, None] - 0.5 * math.log(2 * math.pi)
        log_q = log_q + self.log_potential(u)
        ends = torch.maximum(log_q[:, 0], log_q[:, -1]) - log_q.amax(-1)
        if (ends > -40).any():
            raise NotImplementedError("SigmoidTilt: the quadrature grid misses mass; rescale")
        return u, log_q, (hi - lo) / (n - 1)

    def _log_weights(self, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Nodes and log quadrature weights (trapezoid × integrand), ``(K, n)`` each."""
        u, log_q, h = self.grid(m, s)
        log_w = log_q + torch.log(h)[:, None]
        log_w[:, [0, -1]] -= math.log(2)
        return u, log_w

    def log_mass(self, m: Tensor, s: Tensor) -> Tensor:
        """log ∫ N(u; m, s²) e^{t(u)} du, ``(K,)``."""
        return torch.logsumexp(self._log_weights(m, s)[1], dim=-1)

    def expect(self, m: Tensor, s: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """E[fn(u)] under each component's tilted law, ``(K,)``."""
        u, log_w = self._log_weights(m, s)
        return (log_w.softmax(-1) * fn(u)).sum(-1)

    def moments(self, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        u, log_w = self._log_weights(m, s)
        p = log_w.softmax(-1)
        mean = (p * u).sum(-1)
        return mean, (p * (u - mean[:, None]) ** 2).sum(-1)

    def sample(self, m: Tensor, s: Tensor, index: Tensor, generator: torch.Generator) -> Tensor:
        """Inverse CDF of the density interpolated linearly between nodes (exact per cell)."""
        u, log_q, h = self.grid(m, s)
        q = torch.exp(log_q - log_q.amax(-1, keepdim=True))
        cells = 0.5 * h[:, None] * (q[:, 1:] + q[:, :-1])
        cdf = F.pad(torch.cumsum(cells, -1), (1, 0))
        target = _uniform(index, generator) * cdf[index, -1]
        out = torch.empty_like(target)
        for k in index.unique().tolist():
            rows = (index == k).nonzero().squeeze(-1)
            out[rows] = _invert_cell(u[k], q[k], cdf[k], h[k], target[rows])
        return out


def _invert_cell(u: Tensor, q: Tensor, cdf: Tensor, h: Tensor, target: Tensor) -> Tensor:
    """Solve F(u_j + t) = target in the cell with density q_j + (q_{j+1} − q_j)t/h.

    F = F_j + q_j t + Δ t²/(2h), so t = 2R / (q_j + √(q_j² + 2ΔR/h)) with R = target − F_j
    (the cancellation-free root).
    """
    j = (torch.searchsorted(cdf, target, right=True) - 1).clamp(0, u.numel() - 2)
    rest = (target - cdf[j]).clamp_min(0)
    qj, dq = q[j], q[j + 1] - q[j]
    root = torch.sqrt((qj * qj + 2 * dq * rest / h).clamp_min(0))
    denom = qj + root
    t = torch.where(denom > 0, 2 * rest / denom, torch.zeros_like(rest))
    return u[j] + t.clamp(min=0).minimum(h)


def _uniform(index: Tensor, generator: torch.Generator) -> Tensor:
    return open_uniform(tuple(index.shape), generator, F64).to(index.device)


class _ReweightedComponents:
    """A target whose components are those of ``base`` reweighted by per-component masses:
    log-weights ``_log_w`` = log π_k + log Z_k, so log Z = log Z_base + logsumexp(_log_w)."""

    __slots__ = ()
    base: GaussianMixtureTarget
    _log_w: Tensor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.base.sample_shape

    @property
    def log_normalizer(self) -> Tensor:
        return self.base.log_normalizer + torch.logsumexp(self._log_w, -1)

    @property
    def component_weights(self) -> Tensor:
        return self._log_w.softmax(-1)


@dataclass(frozen=True, slots=True)
class ProjectedTiltTarget(_ReweightedComponents):
    """p*(x) ∝ p(x)·exp(t(aᵀx)): a Gaussian-mixture target tilted along one direction.

    Per component k: m_k = aᵀμ_k, s_k² = aᵀΣ_k a, g_k = Σ_k a / s_k². With the tilted 1-D
    law of u having mass Z_k, mean ū_k and variance v_k:

        weights ∝ π_k Z_k,   mean_k = μ_k + g_k (ū_k − m_k),
        cov_k = Σ_k + (v_k − s_k²) g_k g_kᵀ,   log Z = log Z_base + log Σ_k π_k Z_k.
    """

    base: GaussianMixtureTarget
    direction: Tensor
    tilt: HalfLine | SigmoidTilt
    _m: Tensor = field(init=False)
    _s: Tensor = field(init=False)
    _gain: Tensor = field(init=False)
    _log_w: Tensor = field(init=False)

    def __post_init__(self) -> None:
        mix = self.base.mixture
        cov_a = mix.full_covariances @ self.direction
        var = cov_a @ self.direction
        m, s = mix.means @ self.direction, var.sqrt()
        object.__setattr__(self, "_m", m)
        object.__setattr__(self, "_s", s)
        object.__setattr__(self, "_gain", cov_a / var[:, None])
        log_w = mix.log_weights + self.tilt.log_mass(m, s)
        if not torch.isfinite(log_w).any():
            raise ValueError("factors: the tilted or truncated target has no mass")
        object.__setattr__(self, "_log_w", log_w)

    def _component_moments(self) -> tuple[Tensor, Tensor]:
        mean_u, var_u = self.tilt.moments(self._m, self._s)
        g = self._gain
        means = self.base.mixture.means + g * (mean_u - self._m)[:, None]
        scale = var_u - self._s**2
        covs = (
            self.base.mixture.full_covariances + scale[:, None, None] * g[:, :, None] * g[:, None]
        )
        return means, covs

    @property
    def mean(self) -> Tensor:
        means, _ = self._component_moments()
        return (self.component_weights @ means).reshape(self.sample_shape)

    @property
    def covariance(self) -> Tensor:
        means, covs = self._component_moments()
        return mixture_covariance(self.component_weights, means, covs)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """k ~ weights, u ~ tilted 1-D law, x = z + g_k (u − aᵀz) with z ~ N(μ_k, Σ_k)."""
        device = generator.device
        k = torch.multinomial(self.component_weights.to(device), n, True, generator=generator)
        u = self.tilt.sample(self._m.to(device), self._s.to(device), k, generator)
        z = _component_draws(self.base.mixture, k, generator)
        a = self.direction.to(device)
        x = z + self._gain.to(device)[k] * (u - z @ a)[:, None]
        if isinstance(self.tilt, HalfLine):
            x = _inside_half_space(x, a, self.tilt.offset)
        return x.reshape(n, *self.sample_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) + t(aᵀx) − log Σ_k π_k Z_k, ``(n,)``."""
        flat = flat_batch(x, self.sample_shape, None).to(F64)
        u = flat @ self.direction.to(flat.device)
        log_z = torch.logsumexp(self._log_w, -1)
        return self.base.log_prob(flat.reshape(x.shape)) + self.tilt.log_potential(u) - log_z

    def assign(self, x: Tensor) -> Tensor:
        """The tilt multiplies every component alike, so the base responsibilities decide."""
        return self.base.assign(x)

    def expect_projection(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """E[fn(aᵀx)] under the target, by quadrature (sigmoid tilts only)."""
        if not isinstance(self.tilt, SigmoidTilt):
            raise NotImplementedError("expect_projection: needs a sigmoid tilt")
        return self.component_weights @ self.tilt.expect(self._m, self._s, fn)


def _component_draws(mix: GaussianMixture, k: Tensor, generator: torch.Generator) -> Tensor:
    """z_i ~ N(μ_{k_i}, Σ_{k_i}), ``(n, d)`` float64 (Cholesky factors of the chosen components)."""
    device = generator.device
    eps = torch.randn((k.numel(), mix.dim), generator=generator, dtype=F64, device=device)
    chol = torch.linalg.cholesky(mix.full_covariances.to(device))
    return mix.means.to(device)[k] + torch.einsum("nij,nj->ni", chol[k], eps)


def _inside_half_space(x: Tensor, a: Tensor, b: float) -> Tensor:
    """Move draws that rounding put past aᵀx = b back inside (by a few ulps of |aᵀx|)."""
    for _ in range(4):
        excess = x @ a - b
        if not (excess > 0).any():
            break
        slack = 8 * torch.finfo(x.dtype).eps * (abs(b) + (x.abs() @ a.abs()))
        step = torch.where(excess > 0, excess + slack, torch.zeros_like(excess))
        x = x - step[:, None] * a / (a @ a)
    return x


@dataclass(frozen=True, slots=True)
class BoxTarget(_ReweightedComponents):
    """A diagonal Gaussian-mixture target restricted to low ≤ x ≤ high.

    Per component, with α_kj = (low_j − μ_kj)/s_kj and β_kj = (high_j − μ_kj)/s_kj:
    Z_k = Π_j (Φ(β_kj) − Φ(α_kj)), and each coordinate is an independent truncated normal.
    """

    base: GaussianMixtureTarget
    low: Tensor
    high: Tensor
    _alpha: Tensor = field(init=False)
    _beta: Tensor = field(init=False)
    _log_w: Tensor = field(init=False)

    def __post_init__(self) -> None:
        mix = self.base.mixture
        if not mix.diagonal:
            raise NotImplementedError(
                "Box: exact masses need diagonal covariances (a full-covariance Gaussian's box "
                "probability has no closed form); use HalfSpace or diagonal experts"
            )
        s = mix.covariances.sqrt()
        alpha, beta = (self.low - mix.means) / s, (self.high - mix.means) / s
        log_w = mix.log_weights + log_ndtr_diff(alpha, beta).sum(-1)
        if not torch.isfinite(log_w).any():
            raise ValueError("factors: the box has no mass under the target")
        object.__setattr__(self, "_alpha", alpha)
        object.__setattr__(self, "_beta", beta)
        object.__setattr__(self, "_log_w", log_w)

    def _component_moments(self) -> tuple[Tensor, Tensor]:
        mix = self.base.mixture
        s = mix.covariances.sqrt()
        mean_z, var_z = truncnorm_moments(self._alpha, self._beta)
        return mix.means + s * mean_z, torch.diag_embed(s * s * var_z)

    @property
    def mean(self) -> Tensor:
        means, _ = self._component_moments()
        return (self.component_weights @ means).reshape(self.sample_shape)

    @property
    def covariance(self) -> Tensor:
        means, covs = self._component_moments()
        return mixture_covariance(self.component_weights, means, covs)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """k ~ weights, then x_j = μ_kj + s_kj z_j with z_j ~ N(0, 1) on [α_kj, β_kj]."""
        device = generator.device
        k = torch.multinomial(self.component_weights.to(device), n, True, generator=generator)
        mix = self.base.mixture
        u = open_uniform((n, mix.dim), generator, F64)
        z = truncnorm_sample(self._alpha.to(device)[k], self._beta.to(device)[k], u)
        x = mix.means.to(device)[k] + mix.covariances.sqrt().to(device)[k] * z
        x = torch.maximum(torch.minimum(x, self.high.to(device)), self.low.to(device))
        return x.reshape(n, *self.sample_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        flat = flat_batch(x, self.sample_shape, None).to(F64)
        low, high = self.low.to(flat.device), self.high.to(flat.device)
        inside = ((flat >= low) & (flat <= high)).all(-1)
        log_z = torch.logsumexp(self._log_w, -1)
        base = self.base.log_prob(flat.reshape(x.shape))
        return torch.where(inside, base - log_z, -math.inf)

    def assign(self, x: Tensor) -> Tensor:
        return self.base.assign(x)


# --- expected rewards ------------------------------------------------------------------------


def expected_reward(target: ExactTarget, reward: object) -> Tensor:
    """E_target[r(x)] in closed form (or to quadrature), a 0-d float64 tensor.

    * ``LinearReward``: aᵀE[x] + b, for every target.
    * ``QuadraticReward``: b − ½(tr(A Cov) + (E[x] − c)ᵀA(E[x] − c)), for every target.
    * ``SigmoidReward``: 1-D quadrature along a, for Gaussian-mixture targets and for targets
      sigmoid-tilted along a parallel direction.
    Anything else raises ``NotImplementedError``.
    """
    d = math.prod(target.sample_shape)
    if getattr(reward, "dim", d) != d:
        raise ValueError(f"reward: has {reward.dim} coordinates, the target {d}")
    if isinstance(reward, LinearReward):
        return target.mean.reshape(-1) @ reward.direction + reward.offset
    if isinstance(reward, QuadraticReward):
        diff = target.mean.reshape(-1) - reward.center
        a = reward.precision
        return reward.offset - 0.5 * ((a * target.covariance).sum() + diff @ a @ diff)
    if isinstance(reward, SigmoidReward):
        return _expected_sigmoid(target, reward)
    raise NotImplementedError(f"expected_reward: no closed form for {type(reward).__name__}")


def _expected_sigmoid(target: ExactTarget, reward: SigmoidReward) -> Tensor:
    a = reward.direction
    if isinstance(target, GaussianMixtureTarget):
        mix = target.mixture
        m, s = mix.means @ a, (a @ mix.full_covariances @ a).sqrt()
        tilt = SigmoidTilt(reward.offset, reward.sharpness, 0.0)
        return mix.weights @ tilt.expect(m, s, reward.of_projection)
    if isinstance(target, ProjectedTiltTarget) and isinstance(target.tilt, SigmoidTilt):
        t = target.direction
        scale = (a @ t) / (t @ t)
        if torch.allclose(a, scale * t, rtol=1e-9, atol=1e-12 * float(a.abs().max())):
            return target.expect_projection(lambda u: reward.of_projection(scale * u))
    raise NotImplementedError(
        "expected_reward: a sigmoid reward needs a Gaussian-mixture target or one tilted along "
        "the same direction"
    )
