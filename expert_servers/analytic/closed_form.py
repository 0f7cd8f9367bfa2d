"""The exact product of analytic factors, when it has a closed form.

Target and normaliser (p_i normalised clean densities, r_j rewards, C_k constraint sets):

    p*(x) = (1/Z) Π_i p_i(x)^{w_i} · Π_j exp(λ_j r_j(x)) · Π_k 1[x ∈ C_k]
    Z     = ∫ Π_i p_i^{w_i} · Π_j exp(λ_j r_j) · Π_k 1_{C_k} dx       (``log_normalizer``)

so for one expert p times exp(λr), Z = E_p[exp(λr)]; for one expert truncated to C, Z = P_p(C).

Method: every conjugate factor is a sum of unnormalised Gaussian terms
exp(c − ½xᵀΛx + ηᵀx) (natural parameters). Products multiply term by term (Λ and η add, over
all tuples of components), and a term with Λ ≻ 0 integrates to
exp(c + ½ηᵀΛ⁻¹η)·(2π)^{d/2}|Λ|^{−1/2}, which gives the weights and log Z. Supported:

* generative ``GaussianMixture`` factors with exponent w = 1, any positive integer w (K^w
  terms), any real w for one Gaussian; with a region mask (the kernel's rule: the score counts
  only inside the mask), a factor is its marginal on the masked coordinates, which needs the
  expert's inside and outside coordinates independent and, for K > 1, its components equal
  outside (see ``regional_mixture``); a single diagonal Gaussian takes any mask in [0, 1]
  (exponent w·m_j per coordinate);
* ``LinearReward`` λ(aᵀx + b): Λ = 0, η = λa; ``QuadraticReward`` λ(b − ½(x − c)ᵀA(x − c)):
  Λ = λA, η = λAc;
* then at most one non-conjugate factor: a ``SigmoidReward`` or a ``HalfSpace``
  (``ProjectedTiltTarget``), or ``Box`` constraints, intersected (``BoxTarget``, diagonal
  covariances only).

Anything else raises ``NotImplementedError`` saying which factor; a product that does not
integrate (a precision not positive definite) raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.expert_servers.analytic.constraints import Box, HalfSpace
from poegen.expert_servers.analytic.mixture import GaussianMixture
from poegen.expert_servers.analytic.rewards import LinearReward, QuadraticReward, SigmoidReward
from poegen.expert_servers.analytic.targets import (
    BoxTarget,
    ExactTarget,
    GaussianMixtureTarget,
    HalfLine,
    ProjectedTiltTarget,
    SigmoidTilt,
)
from poegen.kernel.experts import ExpertKind
from poegen.kernel.spec import Factor

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, slots=True)
class _Terms:
    """Σ_k exp(c_k − ½xᵀΛ_k x + η_kᵀx): precision Λ ``(K, d, d)``, shift η ``(K, d)``, c ``(K,)``."""

    precision: Tensor
    shift: Tensor
    log_scale: Tensor
    diagonal: bool

    @staticmethod
    def one(d: int) -> _Terms:
        zero = torch.zeros
        return _Terms(zero(1, d, d, dtype=F64), zero(1, d, dtype=F64), zero(1, dtype=F64), True)

    def times(self, other: _Terms) -> _Terms:
        """The product: one term per pair of components, parameters added."""
        k1, k2 = self.log_scale.numel(), other.log_scale.numel()
        d = self.shift.shape[-1]
        return _Terms(
            (self.precision[:, None] + other.precision[None]).reshape(k1 * k2, d, d),
            (self.shift[:, None] + other.shift[None]).reshape(k1 * k2, d),
            (self.log_scale[:, None] + other.log_scale[None]).reshape(k1 * k2),
            self.diagonal and other.diagonal,
        )

    def power(self, w: float, what: str) -> _Terms:
        """The terms raised to w: exact for w = 1, one term (scale all by w), integer w ≥ 0."""
        if w == 1:
            return self
        if self.log_scale.numel() == 1:
            return _Terms(w * self.precision, w * self.shift, w * self.log_scale, self.diagonal)
        if w == int(w) and w >= 0:
            out = _Terms.one(self.shift.shape[-1])
            for _ in range(int(w)):
                out = out.times(self)
            return out
        raise NotImplementedError(
            f"{what}: a mixture of {self.log_scale.numel()} components raised to w = {w} has no "
            "closed form (use w = 1, an integer, or a single Gaussian)"
        )


def _mixture_terms(mix: GaussianMixture, log_normalizer: float | Tensor = 0.0) -> _Terms:
    """Z·Σ_k π_k N(x; μ_k, Σ_k): Λ = Σ⁻¹, η = Σ⁻¹μ, c = log Z + log π − ½μᵀΣ⁻¹μ − ½log|2πΣ|."""
    if mix.diagonal:
        prec = torch.diag_embed(1 / mix.covariances)
        log_det = mix.covariances.log().sum(-1)
    else:
        chol = torch.linalg.cholesky(mix.covariances)
        prec = torch.cholesky_inverse(chol)
        log_det = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
    shift = (prec @ mix.means[..., None])[..., 0]
    quad = (shift * mix.means).sum(-1)
    log_scale = log_normalizer + mix.log_weights - 0.5 * (quad + log_det + mix.dim * LOG_2PI)
    return _Terms(prec, shift, log_scale, mix.diagonal)


def _diagonal_power_terms(mean: Tensor, var: Tensor, e: Tensor) -> _Terms:
    """Π_j N(x_j; μ_j, s_j²)^{e_j}: Λ = diag(e/s²), η = eμ/s², c = Σ e_j(−½μ_j²/s_j² − ½log 2πs_j²)."""
    prec = e / var
    log_scale = (e * (-0.5 * mean * mean / var - 0.5 * torch.log(2 * math.pi * var))).sum()
    return _Terms(torch.diag(prec)[None], (prec * mean)[None], log_scale[None], True)


def _embed(terms: _Terms, idx: Tensor, d: int) -> _Terms:
    """Terms on the coordinates ``idx`` as terms on all d (zero precision elsewhere)."""
    k = terms.log_scale.numel()
    prec = torch.zeros(k, d, d, dtype=F64)
    prec[:, idx[:, None], idx] = terms.precision
    shift = torch.zeros(k, d, dtype=F64)
    shift[:, idx] = terms.shift
    return _Terms(prec, shift, terms.log_scale, terms.diagonal)


def _region_mask(region: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    m = torch.as_tensor(region, dtype=F64, device="cpu")
    try:
        m = m.broadcast_to(shape).reshape(-1)
    except RuntimeError:
        raise ValueError(f"region: {what}: shape {tuple(m.shape)} is not {shape}") from None
    if not ((m >= 0) & (m <= 1)).all():
        raise ValueError(f"region: {what}: mask values must lie in [0, 1]")
    return m


def _check_separable(mix: GaussianMixture, inside: Tensor, what: str) -> None:
    """Masked scores are a gradient only if inside/outside are independent and agree outside."""
    out = ~inside
    cov = mix.full_covariances
    tol = 1e-12 * float(cov.abs().max())
    cross = cov[:, inside][:, :, out]
    if cross.numel() and cross.abs().max() > tol:
        raise NotImplementedError(
            f"{what}: the masked score is not the gradient of any density: the expert couples "
            "coordinates inside and outside its region"
        )
    same = torch.allclose(mix.means[:, out], mix.means[:1, out], rtol=1e-12, atol=tol)
    same &= torch.allclose(cov[:, out][:, :, out], cov[:1, out][:, :, out], rtol=1e-12, atol=tol)
    if not same:
        raise NotImplementedError(
            f"{what}: a regional mixture needs components that agree outside the region (the "
            "responsibilities would otherwise depend on it); build it with regional_mixture"
        )


def _generative_terms(mix: GaussianMixture, weight: float, region: Tensor | None) -> _Terms:
    """p^w, or with a mask m the factor whose score is m ⊙ ∇log p (see the module docstring)."""
    what = f"factor {mix.name!r}"
    mask = None if region is None else _region_mask(region, mix.sample_shape, what)
    if mix.num_components == 1 and mix.diagonal:
        e = weight * (torch.ones(mix.dim, dtype=F64) if mask is None else mask)
        return _diagonal_power_terms(mix.means[0], mix.covariances[0], e)
    if mask is None:
        return _mixture_terms(mix).power(weight, what)
    if not ((mask == 0) | (mask == 1)).all():
        raise NotImplementedError(f"{what}: a fractional mask needs a single diagonal Gaussian")
    inside = mask == 1
    if not inside.any():
        return _Terms.one(mix.dim)
    _check_separable(mix, inside, what)
    terms = _mixture_terms(mix.marginal(mask.reshape(mix.sample_shape))).power(weight, what)
    return _embed(terms, inside.nonzero().squeeze(-1), mix.dim)


def _reward_terms(reward: LinearReward | QuadraticReward, lam: float) -> _Terms:
    """exp(λ r) as one Gaussian term."""
    if isinstance(reward, LinearReward):
        d = reward.dim
        offset = torch.tensor([lam * reward.offset], dtype=F64)
        return _Terms(torch.zeros(1, d, d, dtype=F64), lam * reward.direction[None], offset, True)
    a, c = lam * reward.precision, reward.center
    log_scale = lam * reward.offset - 0.5 * c @ a @ c
    return _Terms(a[None], (a @ c)[None], log_scale[None], reward.diagonal)


def _to_target(terms: _Terms, sample_shape: tuple[int, ...]) -> GaussianMixtureTarget:
    """Normalise the terms: Σ = Λ⁻¹, μ = Λ⁻¹η, log mass = c + ½ηᵀμ + ½log|2πΣ|."""
    chol, info = torch.linalg.cholesky_ex(terms.precision)
    if (info != 0).any():
        k = int((info != 0).nonzero()[0])
        raise ValueError(
            f"factors: the product does not integrate (component {k}'s precision is not positive "
            "definite); check the exponents and reward weights"
        )
    if terms.diagonal:
        cov = 1 / torch.diagonal(terms.precision, dim1=-2, dim2=-1)
        mean = cov * terms.shift
    else:
        cov = torch.cholesky_inverse(chol)
        cov = 0.5 * (cov + cov.mT)
        mean = (cov @ terms.shift[..., None])[..., 0]
    half_log_det = -torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
    d = terms.shift.shape[-1]
    log_mass = terms.log_scale + 0.5 * (terms.shift * mean).sum(-1) + half_log_det
    log_mass = log_mass + 0.5 * d * LOG_2PI
    mix = GaussianMixture(mean, cov, log_mass.softmax(-1), name="exact", sample_shape=sample_shape)
    return GaussianMixtureTarget(mix, torch.logsumexp(log_mass, -1))


# --- public API ------------------------------------------------------------------------------


def product(
    experts: Sequence[GaussianMixture],
    weights: Sequence[float] | None = None,
    regions: Sequence[Tensor | None] | None = None,
) -> GaussianMixtureTarget:
    """Π_i p_i^{w_i} (with optional region masks) as a normalised mixture with its log Z."""
    weights = [1.0] * len(experts) if weights is None else list(weights)
    regions = [None] * len(experts) if regions is None else list(regions)
    if not (len(experts) == len(weights) == len(regions)):
        raise ValueError("weights: needs one weight (and one region) per expert")
    factors = [Factor(e, w, r) for e, w, r in zip(experts, weights, regions, strict=True)]
    target = exact_target(factors)
    assert isinstance(target, GaussianMixtureTarget)
    return target


def tilt(
    target: GaussianMixtureTarget,
    reward: LinearReward | QuadraticReward | SigmoidReward,
    weight: float = 1.0,
) -> ExactTarget:
    """The target times exp(λ·r) with λ = ``weight``, renormalised; log Z accumulates."""
    _check_dim(target, reward, "reward")
    if isinstance(reward, LinearReward | QuadraticReward):
        terms = _mixture_terms(target.mixture, target.log_normalizer)
        return _to_target(terms.times(_reward_terms(reward, weight)), target.sample_shape)
    if isinstance(reward, SigmoidReward):
        sig = SigmoidTilt(reward.offset, reward.sharpness, float(weight))
        return ProjectedTiltTarget(target, reward.direction, sig)
    raise NotImplementedError(f"tilt: no closed form for {type(reward).__name__}")


def truncate(target: GaussianMixtureTarget, constraint: HalfSpace | Box) -> ExactTarget:
    """The target restricted to the constraint set, renormalised; log Z adds log P(x ∈ C)."""
    _check_dim(target, constraint, "constraint")
    if isinstance(constraint, HalfSpace):
        return ProjectedTiltTarget(target, constraint.normal, HalfLine(constraint.offset))
    if isinstance(constraint, Box):
        return BoxTarget(target, constraint.low, constraint.high)
    raise NotImplementedError(f"truncate: no closed form for {type(constraint).__name__}")


def exact_target(factors: Sequence[Factor]) -> ExactTarget:
    """The exact target of a list of factors: product, then conjugate tilts, then at most one
    non-conjugate factor (sigmoid tilt, half-space) or any number of boxes."""
    generative, conjugate, other = _split(factors)
    first = generative[0].expert
    terms = _Terms.one(first.dim)
    for f in generative:
        if f.expert.sample_shape != first.sample_shape:
            raise ValueError(
                f"factors: {f.expert.name!r} has sample shape {f.expert.sample_shape}, "
                f"{first.name!r} {first.sample_shape}"
            )
        terms = terms.times(_generative_terms(f.expert, f.weight, f.region))
    for f in conjugate:
        _check_dim(first, f.expert, "factors")
        terms = terms.times(_reward_terms(f.expert, f.weight))
    target = _to_target(terms, first.sample_shape)
    boxes = [f.expert for f in other if isinstance(f.expert, Box)]
    if boxes and len(boxes) == len(other):
        return truncate(target, _intersect(boxes))
    if len(other) == 1:
        f = other[0]
        if isinstance(f.expert, SigmoidReward):
            return tilt(target, f.expert, f.weight)
        return truncate(target, f.expert)
    if other:
        names = ", ".join(repr(f.expert.name) for f in other)
        raise NotImplementedError(
            f"factors: no closed form for several non-conjugate factors together ({names})"
        )
    return target


def _split(factors: Sequence[Factor]) -> tuple[list[Factor], list[Factor], list[Factor]]:
    """Generative, conjugate (linear/quadratic) and other factors; rejects unknown experts."""
    generative, conjugate, other = [], [], []
    for i, f in enumerate(factors):
        e, kind = f.expert, f.expert.describe().kind
        if kind == ExpertKind.GENERATIVE and isinstance(e, GaussianMixture):
            generative.append(f)
        elif kind != ExpertKind.GENERATIVE and f.region is not None:
            raise ValueError(f"factors[{i}]: only generative factors take a region")
        elif kind == ExpertKind.CONSTRAINT and isinstance(e, HalfSpace | Box):
            if f.weight <= 0:
                raise ValueError(f"factors[{i}]: weight of a constraint must be positive")
            other.append(f)
        elif isinstance(e, LinearReward | QuadraticReward):
            conjugate.append(f)
        elif isinstance(e, SigmoidReward):
            if f.weight != 0:
                other.append(f)
        else:
            raise NotImplementedError(
                f"factors[{i}]: no closed form for a {kind} expert of type {type(e).__name__}"
            )
    if not generative:
        raise ValueError("factors: needs at least one generative GaussianMixture factor")
    return generative, conjugate, other


def _check_dim(base: object, expert: object, what: str) -> None:
    d_base = math.prod(base.sample_shape)
    d = math.prod(expert.sample_shape)
    if d != d_base:
        raise ValueError(f"{what}: {expert.name!r} has {d} coordinates, the target {d_base}")


def _intersect(boxes: Sequence[Box]) -> Box:
    low = torch.stack([b.low for b in boxes]).amax(0)
    high = torch.stack([b.high for b in boxes]).amin(0)
    if not (low < high).all():
        raise ValueError("factors: the boxes do not intersect")
    return Box(low, high, name="+".join(b.name for b in boxes))
