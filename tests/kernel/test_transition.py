"""The FK transition against closed forms: the rate (2) of ``poegen.kernel.transition``
against the Feynman–Kac PDE evaluated by autograd, and weighted particle sets against the exact
noised product of Gaussians at intermediate levels (tolerances from the Monte Carlo error)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from poegen.expert_servers.analytic import GaussianMixture, exact_target
from poegen.kernel import Factor, SamplerSettings, sample
from poegen.kernel import transition as fk

F64 = torch.float64


def gaussian_1d(mean: float, var: float, name: str) -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[mean]], dtype=F64),
        torch.tensor([[var]], dtype=F64),
        torch.tensor([1.0], dtype=F64),
        name=name,
    )


def noised_product(params, sigma: float) -> tuple[float, float]:
    """Mean and variance of Π_i N((1−σ)m_i, (1−σ)²v_i + σ²)^{β_i} (a Gaussian)."""
    precision = sum(b / ((1 - sigma) ** 2 * v + sigma**2) for m, v, b in params)
    weighted = sum(b * (1 - sigma) * m / ((1 - sigma) ** 2 * v + sigma**2) for m, v, b in params)
    return weighted / precision, 1 / precision


@pytest.mark.parametrize("sigma", [0.9, 0.5, 0.1])
@pytest.mark.parametrize("betas", [(1.0, 1.0), (0.7, 0.6), (1.5, -0.5)])
def test_rate_solves_the_feynman_kac_pde(sigma, betas):
    """A = ∂_τℓ + ∇·b + b·∇ℓ − (g²/2)(Δℓ + ‖∇ℓ‖²) with b = −V + (g²/2)∇ℓ, by autograd on the
    exact log-densities (any g: the g-terms cancel; checked at g² = 0.3)."""
    experts = [gaussian_1d(1.0, 0.25, "a"), gaussian_1d(-1.0, 1.0, "b")]
    x = torch.linspace(-2, 2, 9, dtype=F64).reshape(-1, 1)
    n = x.shape[0]

    def ell(x, s):  # ℓ = Σ β_i log p_{i,σ}
        return sum(
            b * e.log_prob(x, torch.full((n,), s, dtype=F64))
            for b, e in zip(betas, experts, strict=True)
        )

    total = torch.tensor([sum(betas)], dtype=F64)
    sig = torch.full((n,), sigma, dtype=F64)
    velocities = [e.velocity(x, sig) for e in experts]
    rate = fk.fk_log_rate(x, sigma, velocities, list(betas), total)

    h, g2 = 1e-5, 0.3
    d_tau = ((ell(x, sigma - h) - ell(x, sigma + h)) / (2 * h)).reshape(-1, 1)  # ∂_τ = −∂_σ
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(ell(xr, sigma).sum(), xr, create_graph=True)[0]
    lap = torch.autograd.grad(grad.sum(), xr)[0]
    summed = sum(b * v for b, v in zip(betas, velocities, strict=True))
    drift = -summed + 0.5 * g2 * grad.detach()
    xv = x.clone().requires_grad_(True)
    v_of_x = sum(b * e.velocity(xv, sig) for b, e in zip(betas, experts, strict=True))
    div_v = torch.autograd.grad(v_of_x.sum(), xv)[0]
    div_b = -div_v + 0.5 * g2 * lap
    s = grad.detach()
    expected = d_tau + div_b + drift * s - 0.5 * g2 * (lap + s.square())
    torch.testing.assert_close(rate, expected.reshape(-1), atol=1e-6, rtol=1e-6)


def _weighted_moments(x: torch.Tensor, log_w: torch.Tensor) -> tuple[float, float, float]:
    w = torch.softmax(log_w, 0)
    mean = float((w * x).sum())
    var = float((w * (x - mean) ** 2).sum())
    ess = float(1 / w.square().sum())
    return mean, var, ess


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_weighted_particles_reach_the_noised_product_at_an_intermediate_level(noise):
    """N(1, ¼) × N(−1, 1) carried from σ = 1 to σ = 0.3 with FK weights, no resampling: the
    weighted mean and variance of x_σ are those of the exact product of the noised experts
    (to the Monte Carlo error plus the O(Δτ) discretisation at 200 steps)."""
    params = ((1.0, 0.25, 1.0), (-1.0, 1.0, 1.0))
    experts = [gaussian_1d(m, v, f"e{i}") for i, (m, v, _) in enumerate(params)]
    betas = [b for *_, b in params]
    n, grid = 100_000, torch.linspace(1, 0.3, 201, dtype=F64).tolist()
    total = torch.tensor([sum(betas)], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    x = fk.initial_noise((n, 1), total, generator=gen, dtype=F64)
    log_w = torch.zeros(n, dtype=F64)

    def evaluate(x, s):
        sig = torch.full((n,), s, dtype=F64)
        vs = [e.velocity(x, sig) for e in experts]
        return sum(b * v for b, v in zip(betas, vs, strict=True)), fk.fk_log_rate(
            x, s, vs, betas, total
        )

    v, rate = evaluate(x, 1.0)
    for s, s_next in itertools.pairwise(grid):
        x = fk.fk_step(x, s, s_next, v, total, noise, generator=gen)
        v, rate_next = evaluate(x, s_next)
        log_w += fk.fk_log_increment(rate, rate_next, s, s_next)
        rate = rate_next
    mean, var, ess = _weighted_moments(x[:, 0], log_w)
    exact_mean, exact_var = noised_product(params, grid[-1])
    se = math.sqrt(exact_var / ess)
    assert abs(mean - exact_mean) < 4 * se + 0.01
    assert abs(var - exact_var) < 4 * exact_var * math.sqrt(2 / ess) + 0.01


@pytest.mark.parametrize("control", [True, False], ids=["control", "no-control"])
@pytest.mark.parametrize(
    "weights", [(1.0, 1.0), (0.5, 0.5), (1.5, -0.5)], ids=["product", "geometric", "cfg"]
)
def test_fk_sampler_reaches_the_product_and_its_normaliser(weights, control):
    """The kernel's FK run without moves: moments of Π N^{w_i} (including a negative weight,
    classifier-free guidance as a product) and log Z = log ∫ Π p_i^{w_i}, exact in closed form,
    with and without the control drift (its Stein term has mean zero: log Z is unchanged)."""
    a, b = gaussian_1d(1.0, 0.25, "a"), gaussian_1d(-1.0, 1.0, "b")
    factors = [Factor(a, weight=weights[0]), Factor(b, weight=weights[1])]
    target = exact_target(factors)
    settings = SamplerSettings(
        num_particles=20_000, num_steps=200, mcmc_steps=0, transition="fk", fk_control=control
    )
    result = sample(factors, (1,), settings, generator=torch.Generator().manual_seed(1), dtype=F64)
    mean, var, ess = _weighted_moments(result.particles[:, 0], result.log_weights)
    exact_var = float(target.covariance.reshape(()))
    assert abs(mean - float(target.mean.reshape(()))) < 4 * math.sqrt(exact_var / ess) + 0.01
    assert abs(var - exact_var) < 4 * exact_var * math.sqrt(2 / ess) + 0.02 * exact_var
    assert result.log_evidence == pytest.approx(float(target.log_normalizer), abs=0.05)


def test_one_expert_at_weight_one_has_no_corrector_weight():
    """β = 1: A ≡ 0, so the weights stay equal and nothing is ever resampled."""
    a = gaussian_1d(1.0, 0.25, "a")
    settings = SamplerSettings(num_particles=64, num_steps=10, mcmc_steps=0, transition="fk")
    result = sample(
        [Factor(a)], (1,), settings, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    assert torch.equal(result.log_weights, torch.full((64,), -math.log(64), dtype=F64))
    assert not any(t.resampled for t in result.trace)


def test_noise_free_fk_with_one_expert_is_euler():
    """γ = 0, β = 1: the FK step is the Euler step on the expert's velocity."""
    a = gaussian_1d(1.0, 0.25, "a")
    common = dict(num_particles=16, num_steps=12, mcmc_steps=0)
    fk_run = sample([Factor(a)], (1,), SamplerSettings(transition="fk", sde_noise=0, **common),
                    generator=torch.Generator().manual_seed(0), dtype=F64)  # fmt: skip
    euler = sample([Factor(a)], (1,), SamplerSettings(transition="euler", **common),
                   generator=torch.Generator().manual_seed(0), dtype=F64)  # fmt: skip
    torch.testing.assert_close(fk_run.particles, euler.particles, atol=1e-12, rtol=0)


def test_one_step_runs_are_one_euler_step_to_zero():
    """num_steps = 1 (distilled one-step models): x̂_0 = x − v(x, 1), one level in the trace."""
    a = gaussian_1d(1.0, 0.25, "a")
    settings = SamplerSettings(num_particles=8, num_steps=1, mcmc_steps=0, transition="fk")
    result = sample(
        [Factor(a)], (1,), settings, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    x = torch.randn((8, 1), generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = x - a.velocity(x, torch.ones(8, dtype=F64))
    torch.testing.assert_close(result.particles, expected)
    assert len(result.trace) == 1 and result.trace[0].sigma == 1.0


def test_initial_draws_are_the_product_of_standard_normals():
    """π_1 = Π N(0, 1)^{β_i} = N(0, 1/B): variance 1/B per coordinate, and its normaliser."""
    total = torch.tensor([2.0, 0.5], dtype=F64)
    x = fk.initial_noise((200_000, 2), total, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(x.var(0), 1 / total, atol=0.01, rtol=0)
    grid = torch.linspace(-12, 12, 48_001, dtype=F64)
    log_density = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
    numeric = sum(
        float(torch.logsumexp(b * log_density, 0) + math.log(24 / 48_000)) for b in total.tolist()
    )
    assert fk.initial_log_normalizer(total) == pytest.approx(numeric, abs=1e-9)


# --- the control drift (3) ------------------------------------------------------------------


def diagonal_gaussian(mean, var, name: str) -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([mean], dtype=F64), torch.tensor([var], dtype=F64), [1.0], name=name
    )


def test_the_stein_term_has_mean_zero_under_the_target():
    """E_π[tr M + (M x + c)·∇log π] = 0 for any diagonal M and c: on exact draws of a
    Gaussian π with its exact score, to the Monte Carlo error."""
    mean, var = torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([0.3, 2.0, 1.0], dtype=F64)
    x = mean + var.sqrt() * torch.randn((400_000, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=F64)  # fmt: skip
    score = -(x - mean) / var
    drift = fk.ControlDrift(torch.tensor([0.7, -1.3, 2.0], dtype=F64),
                            torch.tensor([0.4, 1.5, -0.8], dtype=F64))  # fmt: skip
    term = drift.rate(x, score)
    assert term.std() > 1  # not trivially zero
    assert abs(float(term.mean())) < 4 * float(term.std()) / math.sqrt(x.shape[0])


def test_the_fit_cancels_a_rate_in_the_span_of_its_features():
    """A rate tr M* + (M* x + c*)·S + const is cancelled to rounding by the fitted drift, per
    coordinate with ≥ 8 particles per coordinate and as two scalars below that."""
    gen = torch.Generator().manual_seed(1)
    x, score = torch.randn((256, 4), generator=gen, dtype=F64), torch.randn((256, 4), generator=gen,
                                                                            dtype=F64)  # fmt: skip
    m, c = torch.randn(4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    rate = 3.0 - fk.ControlDrift(m, c).rate(x, score)
    fitted = fk.fit_control_drift(x, score, rate)
    assert fitted is not None and fitted.m.shape == (4,)
    torch.testing.assert_close(fitted.m, m, atol=1e-9, rtol=0)
    assert float((rate + fitted.rate(x, score)).std()) < 1e-9
    few = slice(0, 16)  # 16 < 8·4 particles: m and c are scalars
    scalar_rate = 3.0 - fk.ControlDrift(m[:1], c[:1]).rate(x[few], score[few])
    scalar = fk.fit_control_drift(x[few], score[few], scalar_rate.reshape(-1))
    assert scalar is not None and scalar.m.shape == ()
    assert float((scalar_rate + scalar.rate(x[few], score[few])).std()) < 1e-9


def test_nothing_is_fitted_without_spread_or_particles():
    x = torch.randn((64, 2), dtype=F64)
    assert fk.fit_control_drift(x, -x, torch.zeros(64, dtype=F64)) is None  # one expert, β = 1
    assert fk.fit_control_drift(x[:7], -x[:7], torch.randn(7, dtype=F64)) is None


def test_the_control_drift_keeps_the_weights_of_a_gaussian_product_equal():
    """A product of diagonal Gaussians with unequal variances in 3 coordinates, no moves, no
    resampling: without the drift the weights degenerate (ESS/N 0.04 at 200 levels, log Z off
    by 0.19); with it A is cancelled at every level (the drift completes the transport) up to
    the discretisation: ESS/N 0.9999, log Z within 0.015, the particles on the exact product."""
    factors = [
        Factor(diagonal_gaussian([1.0, 0.0, -1.0], [0.2, 1.0, 3.0], "a")),
        Factor(diagonal_gaussian([-1.0, 2.0, 0.0], [1.0, 0.3, 0.5], "b")),
    ]
    target = exact_target(factors)

    def run(control: bool):
        settings = SamplerSettings(num_particles=4000, num_steps=200, mcmc_steps=0,
                                   transition="fk", fk_control=control, ess_threshold=0.0)  # fmt: skip
        return sample(factors, (3,), settings, generator=torch.Generator().manual_seed(2),
                      dtype=F64)  # fmt: skip

    with_drift, without = run(True), run(False)
    ess = [float(1 / r.weights.square().sum()) / 4000 for r in (with_drift, without)]
    assert ess[0] > 0.999 and ess[1] < 0.2, ess
    w = with_drift.weights[:, None]
    mean = (w * with_drift.particles).sum(0)
    var = (w * (with_drift.particles - mean) ** 2).sum(0)
    exact_var = target.covariance.diagonal()
    torch.testing.assert_close(mean, target.mean.reshape(-1), atol=4 * float(exact_var.max().sqrt())
                               / math.sqrt(4000) + 0.01, rtol=0)  # fmt: skip
    torch.testing.assert_close(var, exact_var, atol=0.03, rtol=0.05)
    assert with_drift.log_evidence == pytest.approx(float(target.log_normalizer), abs=0.02)


def test_the_control_drift_is_fitted_in_float64_for_float32_particles():
    """Flow models run in float32: the drift is fitted in float64 and applied in the particles'
    dtype; the weights of the diagonal Gaussian product still stay even."""
    factors = [
        Factor(diagonal_gaussian([1.0, 0.0], [0.2, 1.0], "a")),
        Factor(diagonal_gaussian([-1.0, 2.0], [1.0, 0.3], "b")),
    ]
    settings = SamplerSettings(num_particles=512, num_steps=50, mcmc_steps=0, transition="fk",
                               ess_threshold=0.0)  # fmt: skip
    result = sample(factors, (2,), settings, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float32)  # fmt: skip
    assert result.particles.dtype == torch.float32
    assert float(1 / result.weights.square().sum()) / 512 > 0.99
