"""A Gaussian-mixture generative expert, exact at every noise level of the rectified-flow path.

For the clean law p₀(x) = Σ_k π_k N(x; μ_k, Σ_k) and x_σ = (1 − σ)·x₀ + σ·ε, the noised marginal
is again a mixture (write α = 1 − σ):

    p_σ(x) = Σ_k π_k N(x; α μ_k, C_k(σ)),   C_k(σ) = α² Σ_k + σ² I.

With Σ_k = U_k diag(λ_k) U_kᵀ (computed once), C_k(σ) = U_k diag(α² λ_k + σ² ) U_kᵀ is diagonal in
the same basis at every σ, so each call costs O(B·K·d²) with no factorisation. Per component,
with y = U_kᵀ(x − α μ_k) and c = α² λ_k + σ²:

    log N_k    = −½ Σ (y²/c + log c) − (d/2) log 2π
    ∇log N_k   = −U_k (y/c)
    E[x₀|x, k] = μ_k + α U_k (λ_k y/c)
    E[ε |x, k] = σ U_k (y/c)
    E[ε − x₀|x, k] = U_k ((σ − α λ_k) y/c) − μ_k

and the mixture weights these by the responsibilities r_k ∝ π_k N_k(x). The velocity is the
posterior mean of the flow-matching target ε − x₀ (what a perfectly trained model outputs); it
equals ``path.velocity_from_x0(x, σ, E[x₀|x])`` for σ > 0 but has no 1/σ, so it is exact down to
σ = 0 (where it is −x) and at σ = 1 (x − E[x₀]). Tests pin it to the ``kernel.path`` identities.

Covariances must be positive definite, so c > 0 and log_prob/score work at σ = 0 too (the clean
density). Diagonal covariances ``(K, d)`` skip the rotations. Parameters are held in float64 on
the CPU; calls follow the input's dtype (at least float32) and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from poegen.expert_servers.analytic._checks import (
    as_max_batch,
    as_param,
    batch_sigma,
    flat_batch,
    resolve_shape,
    revision,
)
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind, autograd_vjp

LOG_2PI = math.log(2 * math.pi)


def _check_parameters(means: Tensor, covariances: Tensor, weights: Tensor) -> None:
    if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
        raise ValueError(f"means: expected shape (K, d), got {tuple(means.shape)}")
    k, d = means.shape
    if covariances.shape not in ((k, d), (k, d, d)):
        raise ValueError(
            f"covariances: expected ({k}, {d}) or ({k}, {d}, {d}), got {tuple(covariances.shape)}"
        )
    if weights.shape != (k,):
        raise ValueError(f"weights: expected shape ({k},), got {tuple(weights.shape)}")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("weights: must be non-negative with a positive sum")


def _eigen(covariances: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues ``(K, d)`` and eigenvectors ``(K, d, d)`` (``None`` when diagonal)."""
    if covariances.ndim == 2:
        if (covariances <= 0).any():
            raise ValueError("covariances: diagonal entries must be positive")
        return covariances, None
    scale = covariances.abs().amax(dim=(-2, -1), keepdim=True)
    if not torch.allclose(covariances, covariances.mT, rtol=0, atol=1e-12 * scale.max().item()):
        raise ValueError("covariances: must be symmetric")
    values, vectors = torch.linalg.eigh(0.5 * (covariances + covariances.mT))
    bad = (values <= 1e-14 * scale.squeeze(-1)).any(dim=-1)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"covariances: component {k} is not positive definite")
    return values, vectors


class GaussianMixture:
    """Generative expert p₀(x) = Σ_k π_k N(x; μ_k, Σ_k), exact on the rectified-flow path.

    Args:
        means: ``(K, d)``.
        covariances: full ``(K, d, d)`` or diagonal ``(K, d)``, positive definite.
        weights: ``(K,)``, non-negative; normalised here.
        name: the expert's name.
        sample_shape: shape ``S`` of one sample with prod(S) = d; default ``(d,)``. Inputs
            ``(B, *S)`` are flattened row-major onto the d coordinates.
        max_batch: largest batch per call (``None``: no limit).

    Tensors or nested lists are accepted, so it can be built from YAML or an entry point.
    """

    def __init__(
        self,
        means: Tensor | Sequence,
        covariances: Tensor | Sequence,
        weights: Tensor | Sequence,
        *,
        name: str = "gaussian_mixture",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> None:
        mu = as_param(means, "means")
        cov = as_param(covariances, "covariances")
        w = as_param(weights, "weights")
        _check_parameters(mu, cov, w)
        self._eigvals, self._eigvecs = _eigen(cov)
        self._means, self._covariances = mu, cov
        self._log_weights = torch.log(w / w.sum())
        self._sample_shape = resolve_shape(sample_shape, mu.shape[1], "sample_shape")
        self._name = str(name)
        self._max_batch = as_max_batch(max_batch)
        self._revision = revision(mu, cov, self._log_weights, extra=str(self._sample_shape))

    def __repr__(self) -> str:
        kind = "diagonal" if self.diagonal else "full"
        return (
            f"GaussianMixture(name={self._name!r}, components={self.num_components}, "
            f"dim={self.dim}, covariances={kind}, sample_shape={self._sample_shape})"
        )

    # --- the Expert protocol -----------------------------------------------------------------

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name=self._name,
            kind=ExpertKind.GENERATIVE,
            capabilities=frozenset({Capability.SCORE, Capability.LOG_PROB, Capability.VJP}),
            sample_shape=self._sample_shape,
            max_batch=self._max_batch,
            model_id="analytic",
            revision=self._revision,
        )

    def log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_σ(x) = logsumexp_k(log π_k + log N_k(x)), normalised; ``(B,)``."""
        flat, s = self._inputs(x, sigma)
        return torch.logsumexp(self._terms(flat, s)[0], dim=0)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """∇log p_σ(x) = −Σ_k r_k C_k⁻¹(x − α μ_k); ``(B, *S)``, exact also at σ = 0."""
        flat, s = self._inputs(x, sigma)
        log_joint, y, c = self._terms(flat, s)
        out = -self._mix(log_joint.softmax(0), y / c)
        return out.reshape(x.shape).to(x.dtype)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x̂₀ = E[x₀ | x_σ] = Σ_k r_k (μ_k + α Σ_k C_k⁻¹(x − α μ_k)); ``(B, *S)``."""
        flat, s = self._inputs(x, sigma)
        log_joint, y, c = self._terms(flat, s)
        r = log_joint.softmax(0)
        gain = (1 - s) * self._eigvals.to(flat)[..., None] / c
        out = r.T @ self._means.to(flat) + self._mix(r, gain * y)
        return out.reshape(x.shape).to(x.dtype)

    def velocity(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """v = E[ε − x₀ | x_σ] = Σ_k r_k (U_k((σ − αλ_k) y/c) − μ_k); ``(B, *S)``."""
        flat, s = self._inputs(x, sigma)
        log_joint, y, c = self._terms(flat, s)
        r = log_joint.softmax(0)
        gain = (s - (1 - s) * self._eigvals.to(flat)[..., None]) / c
        out = self._mix(r, gain * y) - r.T @ self._means.to(flat)
        return out.reshape(x.shape).to(x.dtype)

    def velocity_vjp(self, x: Tensor, sigma: Tensor | float, cotangent: Tensor) -> Tensor:
        """J_v(x)ᵀ·c by autograd through the closed-form velocity; ``(B, *S)``."""
        return autograd_vjp(self.velocity, x, torch.as_tensor(sigma), cotangent)

    # --- the clean law -----------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` exact draws of the clean mixture, ``(n, *S)`` in float64 on the generator's device.

        k ~ Categorical(π), then x = μ_k + U_k (√λ_k ⊙ z), z ~ N(0, I).
        """
        device = generator.device
        k = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64, device=device)
        z = z * self._eigvals.to(device)[k].sqrt()
        if self._eigvecs is not None:
            z = torch.einsum("nij,nj->ni", self._eigvecs.to(device)[k], z)
        return (self._means.to(device)[k] + z).reshape(n, *self._sample_shape)

    def assign(self, x: Tensor) -> Tensor:
        """Index of the most responsible component of each clean sample, ``(n,)`` long."""
        flat = flat_batch(x, self._sample_shape, None)
        zero = torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return self._terms(flat, zero)[0].argmax(dim=0)

    def noised(self, sigma: float) -> GaussianMixture:
        """The law of x_σ as a mixture: means α μ_k, covariances α² Σ_k + σ² I."""
        s = float(sigma)
        if not 0 <= s <= 1:
            raise ValueError(f"sigma: must lie in [0, 1], got {sigma}")
        eye = 1.0 if self.diagonal else torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(
            (1 - s) * self._means,
            (1 - s) ** 2 * self._covariances + s**2 * eye,
            self.weights,
            name=f"{self._name}@{s:g}",
            sample_shape=self._sample_shape,
        )

    def marginal(self, mask: Tensor | Sequence) -> GaussianMixture:
        """The mixture's marginal on the coordinates where ``mask`` (shape S, 0/1) is 1.

        Coordinates keep their row-major order; the result has sample shape ``(|R|,)``.
        """
        m = as_param(mask, "mask")
        if m.numel() != self.dim or not ((m == 0) | (m == 1)).all() or m.sum() < 1:
            raise ValueError(f"mask: expected {self.dim} values in {{0, 1}}, at least one 1")
        idx = m.reshape(-1).nonzero().squeeze(-1)
        cov = self._covariances
        cov = cov[:, idx] if self.diagonal else cov[:, idx][:, :, idx]
        return GaussianMixture(self._means[:, idx], cov, self.weights, name=f"{self._name}|R")

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    @property
    def dim(self) -> int:
        return self._means.shape[1]

    @property
    def num_components(self) -> int:
        return self._means.shape[0]

    @property
    def diagonal(self) -> bool:
        """Whether the covariances were given (and are held) as diagonals ``(K, d)``."""
        return self._covariances.ndim == 2

    @property
    def means(self) -> Tensor:
        """Component means ``(K, d)``."""
        return self._means

    @property
    def covariances(self) -> Tensor:
        """Component covariances as held: ``(K, d)`` if diagonal, else ``(K, d, d)``."""
        return self._covariances

    @property
    def full_covariances(self) -> Tensor:
        """Component covariances ``(K, d, d)``."""
        return torch.diag_embed(self._covariances) if self.diagonal else self._covariances

    @property
    def weights(self) -> Tensor:
        """Normalised component weights π ``(K,)``."""
        return self._log_weights.exp()

    @property
    def log_weights(self) -> Tensor:
        return self._log_weights

    component_weights = weights

    @property
    def mean(self) -> Tensor:
        """E[x] = Σ π_k μ_k, shaped ``S``."""
        return (self.weights @ self._means).reshape(self._sample_shape)

    @property
    def covariance(self) -> Tensor:
        """Cov[x] = Σ π_k (Σ_k + μ_k μ_kᵀ) − E[x]E[x]ᵀ over the flattened coordinates, ``(d, d)``."""
        return mixture_covariance(self.weights, self._means, self.full_covariances)

    # --- internals ---------------------------------------------------------------------------

    def _inputs(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        flat = flat_batch(x, self._sample_shape, self._max_batch)
        return flat, batch_sigma(sigma, flat.shape[0], flat)

    def _terms(self, flat: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log π_k + log N_k(x) ``(K, B)``; rotated residuals y, variances c ``(K, d, B)``.

        The batch is the innermost dimension: elementwise work over tiny K and d stays fast.
        """
        alpha = 1 - s
        y = flat.T - self._means.to(flat)[..., None] * alpha
        if self._eigvecs is not None:
            y = self._eigvecs.to(flat).mT @ y
        c = self._eigvals.to(flat)[..., None] * alpha**2 + s * s
        log_n = -0.5 * ((y * y / c).sum(1) + c.log().sum(1) + self.dim * LOG_2PI)
        return self._log_weights.to(flat)[:, None] + log_n, y, c

    def _mix(self, r: Tensor, w: Tensor) -> Tensor:
        """Σ_k r_k U_k w_k ``(B, d)`` for responsibilities ``(K, B)``, coordinates ``(K, d, B)``."""
        if self._eigvecs is not None:
            w = self._eigvecs.to(w) @ w
        return (r[:, None, :] * w).sum(0).T


def mixture_covariance(weights: Tensor, means: Tensor, covariances: Tensor) -> Tensor:
    """Σ_k w_k (C_k + m_k m_kᵀ) − m̄ m̄ᵀ with m̄ = Σ w_k m_k (law of total covariance)."""
    centred = means - weights @ means
    spread = torch.einsum("k,ki,kj->ij", weights, centred, centred)
    return torch.einsum("k,kij->ij", weights, covariances) + spread


def regional_mixture(
    mixture: GaussianMixture,
    mask: Tensor | Sequence,
    *,
    background_std: float = 1.0,
    name: str | None = None,
) -> GaussianMixture:
    """A full-sample expert to pair with ``Factor(region=mask)``: ``mixture`` on the masked part.

    ``mixture`` lives on the |R| coordinates where ``mask`` (shape S, 0/1) is 1, in row-major
    order. Outside R every component is the same N(0, background_std² I), independent of x_R,
    so the responsibilities (and therefore the score on R) depend on x_R only. The kernel's
    regional rule (score counted only inside the mask) then samples from the product with the
    marginal p_R(x_R) at every σ, and ``exact_target`` treats the factor exactly that way.
    """
    m = as_param(mask, "mask")
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("mask: values must be 0 or 1")
    idx = m.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() != mixture.dim:
        raise ValueError(f"mask: selects {idx.numel()} coordinates, the mixture has {mixture.dim}")
    if not math.isfinite(background_std) or background_std <= 0:
        raise ValueError(f"background_std: must be positive, got {background_std}")
    k, d = mixture.num_components, m.numel()
    means = torch.zeros(k, d, dtype=torch.float64)
    means[:, idx] = mixture.means
    var = background_std**2
    if mixture.diagonal:
        cov = torch.full((k, d), var, dtype=torch.float64)
        cov[:, idx] = mixture.covariances
    else:
        cov = torch.diag_embed(torch.full((k, d), var, dtype=torch.float64))
        cov[:, idx.unsqueeze(-1), idx] = mixture.covariances
    return GaussianMixture(
        means,
        cov,
        mixture.weights,
        name=name or f"{mixture.name}@region",
        sample_shape=tuple(m.shape) if m.ndim else (1,),
    )
