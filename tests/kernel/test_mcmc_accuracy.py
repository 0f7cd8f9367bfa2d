"""HMC and UHMC against exact laws, with bounds from Monte Carlo noise.

* Direct kernel tests (``poegen.kernel.mcmc.hmc`` / ``uhmc``) on an exact correlated 2-D
  Gaussian π = N(μ, Σ). Particles start at exact draws and take K steps; every particle moves
  independently, so the output is N independent draws of the kernel's K-step law, and its mean
  and covariance carry plain Monte Carlo error (Var(x_i x_j) = C_ii C_jj + C_ij² for a
  Gaussian). Bounds are 4 standard errors.

  - HMC is exact (Metropolis on H = −log π + ½‖p‖²): π stays π. The same output is > 8 SE
    from UHMC's law at the same η, so the check can tell an exact kernel from a biased one.
  - UHMC is unadjusted. On a Gaussian its leapfrog (unit mass, ε = √(2η)) conserves the
    shadow energy ½‖p‖² + ½ xᵀ A (I − ε²A/4) x with A = Σ⁻¹ (velocity Verlet on a harmonic
    oscillator), whose p-marginal is N(0, I); refreshing p ← ρp + √(1−ρ²)ξ keeps it too. Its
    invariant law is therefore exactly N(μ, Σ̃), Σ̃ = (A − (η/2)A²)⁻¹: per eigenvalue λ of Σ,
    λ / (1 − η/(2λ)). Started at N(μ, Σ̃) it stays there; it is > 8 SE away from π.

* On a non-Gaussian exact target, a 3-mode 2-D mixture at the fixed noise level σ = 0.3
  (x_σ = (1 − σ)x_0 + σε, a mixture with known law): HMC started at exact draws stays within
  the energy-distance noise floor of exact draws.

* Through the sampler: ``mcmc="hmc"`` and ``"uhmc"`` on the product N(0, I) × N((2, 2), I) =
  N((1, 1), ½I) under the default Euler transition, which needs the MCMC (without moves the
  same run fails the same bound: the averaged velocity does not transport the product).
"""

from __future__ import annotations

import math

import pytest
import torch

from poegen.bench import metrics
from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel import Factor, SamplerSettings, mcmc, sample

F64 = torch.float64
N = 40_000
MU = torch.tensor([0.5, -1.0], dtype=F64)
SIGMA = torch.tensor([[1.0, 0.3], [0.3, 0.35]], dtype=F64)  # eigenvalues ≈ 1.12, 0.23
ETA = 0.05  # UHMC's variance bias on the small eigenvalue ≈ 12 %: > 8 SE at N = 40 000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_target(mu: torch.Tensor, cov: torch.Tensor) -> mcmc.Target:
    precision = torch.linalg.inv(cov)
    log_norm = -0.5 * torch.logdet(2 * math.pi * cov)

    def target(x: torch.Tensor) -> mcmc.TargetEval:
        centred = x - mu
        score = -centred @ precision
        log_prob = -0.5 * (centred @ precision * centred).sum(1) + log_norm
        return mcmc.TargetEval(score=score, log_prob=log_prob, velocity=torch.zeros_like(x))

    return target


def shadow_covariance(cov: torch.Tensor, eta: float) -> torch.Tensor:
    """UHMC's (and ULA's) invariant covariance on N(μ, cov): λ ↦ λ / (1 − η/(2λ))."""
    lam, vec = torch.linalg.eigh(cov)
    return vec @ torch.diag(lam / (1 - eta / (2 * lam))) @ vec.T


def draws(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    chol = torch.linalg.cholesky(cov)
    return mu + torch.randn(n, 2, generator=gen(seed), dtype=F64) @ chol.T


def z_scores(
    x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, log_w: torch.Tensor | None = None
) -> torch.Tensor:
    """|error| / standard error of the (weighted) sample mean (2) and covariance entries (3)
    of ``x`` against the Gaussian N(mu, cov) it should be drawn from; with weights the count
    is their Kish ESS."""
    n = x.shape[0]
    w = torch.full((n,), 1 / n, dtype=F64) if log_w is None else log_w.softmax(0)
    n_eff = 1 / w.square().sum()
    centred = x - mu
    mean = w @ x
    emp = (w[:, None] * centred).T @ centred  # about the known mean: no n − 1 correction
    z_mean = (mean - mu).abs() / (cov.diagonal() / n_eff).sqrt()
    var_entry = (cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n_eff
    idx = [(0, 0), (1, 1), (0, 1)]
    z_cov = torch.stack([(emp[i, j] - cov[i, j]).abs() / var_entry[i, j].sqrt() for i, j in idx])
    return torch.cat([z_mean, z_cov])


def run_kernel(kernel: str, x: torch.Tensor, target: mcmc.Target, steps: int, seed: int):
    g = gen(seed)
    here = target(x)
    momentum, accepted = None, []
    for _ in range(steps):
        if kernel == "hmc":
            x, here, acc = mcmc.hmc(x, here, target, ETA, generator=g, leapfrog_steps=3)
            accepted.append(acc.to(F64).mean().item())
        else:
            x, here, momentum = mcmc.uhmc(
                x, here, target, ETA, generator=g, leapfrog_steps=3, damping=0.5,
                momentum=momentum,
            )  # fmt: skip
    return x, accepted


def test_hmc_keeps_an_exact_gaussian_exact():
    target = gaussian_target(MU, SIGMA)
    x, accepted = run_kernel("hmc", draws(MU, SIGMA, N, 0), target, steps=10, seed=1)
    assert z_scores(x, MU, SIGMA).max() < 4
    # the Metropolis test does work here (not every move is accepted) ...
    assert 0.5 < sum(accepted) / len(accepted) < 0.999
    # ... and the check tells exact from UHMC's O(η) bias at the same step
    assert z_scores(x, MU, shadow_covariance(SIGMA, ETA)).max() > 8


def test_uhmc_keeps_its_closed_form_shadow_gaussian():
    target = gaussian_target(MU, SIGMA)
    shadow = shadow_covariance(SIGMA, ETA)
    x, _ = run_kernel("uhmc", draws(MU, shadow, N, 2), target, steps=10, seed=3)
    assert z_scores(x, MU, shadow).max() < 4
    assert z_scores(x, MU, SIGMA).max() > 8  # unadjusted: π itself is not invariant


def test_hmc_keeps_a_noised_mixture_at_a_fixed_level_exact():
    """A 3-mode mixture at σ = 0.3; exact draws of x_σ in, HMC moves, exact law out."""
    sigma = 0.3
    mix = GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=F64),
        torch.tensor([[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]], dtype=F64),
        [0.5, 0.3, 0.2],
    )

    def noised(n: int, g: torch.Generator) -> torch.Tensor:
        x0 = mix.sample(n, g)
        return (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)

    def target(x: torch.Tensor) -> mcmc.TargetEval:
        s = torch.full((x.shape[0],), sigma, dtype=F64)
        return mcmc.TargetEval(
            score=mix.score(x, s), log_prob=mix.log_prob(x, s), velocity=torch.zeros_like(x)
        )

    n, eta = 2000, 0.25  # ε ≈ 0.71, below 2× the smallest std (0.43): leapfrog is stable
    ref = metrics.Reference(noised(4096, gen(10)), sampler=noised)
    floor = ref.self_term / n  # E[ED] of n exact draws against the reference
    g = gen(11)
    x = noised(n, gen(12))
    here, rates = target(x), []
    for _ in range(20):
        x, here, acc = mcmc.hmc(x, here, target, eta, generator=g, leapfrog_steps=3)
        rates.append(acc.to(F64).mean().item())
    assert 0.3 < sum(rates) / len(rates) < 0.999
    assert ref.energy_distance(x) < 3 * floor
    # the same check fails on UHMC at the same step (its variance bias is O(η)): it has power
    x_u, here_u, p = noised(n, gen(12)), None, None
    here_u = target(x_u)
    for _ in range(20):
        x_u, here_u, p = mcmc.uhmc(
            x_u, here_u, target, eta, generator=g, leapfrog_steps=3, damping=0.5, momentum=p
        )
    assert ref.energy_distance(x_u) > 3 * floor


@pytest.mark.parametrize("kernel", ["hmc", "uhmc"])
def test_the_sampler_with_hmc_kernels_reaches_the_gaussian_product(kernel):
    """N(0, I) × N((2, 2), I) = N((1, 1), ½I); 4 SE of the weighted moments (Kish ESS)."""
    product_mu = torch.tensor([1.0, 1.0], dtype=F64)
    product_cov = 0.5 * torch.eye(2, dtype=F64)
    factors = [
        Factor(GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), [1.0], name="a")),
        Factor(GaussianMixture(torch.full((1, 2), 2.0), torch.ones(1, 2), [1.0], name="b")),
    ]

    def z(mcmc_steps: int) -> torch.Tensor:
        settings = SamplerSettings(
            num_particles=4000, num_steps=40, mcmc_steps=mcmc_steps, mcmc=kernel,
            schedule="linear", transition="euler",
        )  # fmt: skip
        result = sample(factors, (2,), settings, generator=gen(0), dtype=F64)
        return z_scores(result.particles, product_mu, product_cov, result.log_weights)

    assert z(5).max() < 4
    assert z(0).max() > 8  # the Euler transition alone misses the product
