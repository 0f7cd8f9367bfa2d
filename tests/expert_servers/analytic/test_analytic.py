"""The analytic experts: exact velocity/score/log_prob on the rectified-flow path, and their edges."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal

from poegen.expert_servers.analytic import (
    Box,
    GaussianMixture,
    HalfSpace,
    LinearReward,
    QuadraticReward,
    SigmoidReward,
)
from poegen.kernel import path
from poegen.kernel.experts import Capability, ExpertKind, check_expert, create_expert

F64 = torch.float64
SIGMAS = (0.0, 1e-3, 0.05, 0.4, 0.9, 0.999, 1.0)

MEANS = [[-1.0, 0.5], [1.5, -0.5], [0.2, 1.8]]
COVS = [[[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]], [[0.1, 0.0], [0.0, 0.6]]]
WEIGHTS = [5.0, 3.0, 2.0]


def mixture(**kw) -> GaussianMixture:
    return GaussianMixture(MEANS, COVS, WEIGHTS, **kw)


def points(n=64, seed=0, scale=2.0, shape=(2,)):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn((n, *shape), generator=g, dtype=F64)


def full_sigma(s, n=64):
    return torch.full((n,), s, dtype=F64)


# --- the protocol ------------------------------------------------------------------------------


def test_describe_is_a_generative_expert_with_score_and_log_prob():
    info = check_expert(mixture(name="m", max_batch=8))
    assert info.kind == ExpertKind.GENERATIVE
    assert info.capabilities == {Capability.SCORE, Capability.LOG_PROB, Capability.VJP}
    assert (info.name, info.sample_shape, info.max_batch) == ("m", (2,), 8)
    assert info.model_id == "analytic"


def test_revision_is_stable_and_tracks_the_parameters():
    a, b = mixture().describe().revision, mixture().describe().revision
    assert a == b and len(a) == 12
    moved = GaussianMixture([[0.0, 0.0], *MEANS[1:]], COVS, WEIGHTS).describe().revision
    assert moved != a
    # normalisation is part of the parameters: scaled weights are the same mixture
    assert GaussianMixture(MEANS, COVS, [0.5, 0.3, 0.2]).describe().revision == a


def test_entry_points_build_every_expert_from_plain_lists():
    gm = create_expert("gaussian_mixture", means=MEANS, covariances=COVS, weights=WEIGHTS)
    assert isinstance(gm, GaussianMixture)
    for name, config in [
        ("linear_reward", {"direction": [1.0, 2.0]}),
        ("quadratic_reward", {"precision": [1.0, 2.0]}),
        ("sigmoid_reward", {"direction": [1.0, 0.0], "offset": 0.5, "sharpness": 4.0}),
        ("half_space", {"normal": [0.0, 1.0], "offset": 1.0}),
        ("box", {"low": [-1.0, -1.0], "high": [1.0, 2.0]}),
    ]:
        assert create_expert(name, **config).describe().sample_shape == (2,)


# --- exactness on the path ---------------------------------------------------------------------


def test_clean_log_prob_matches_scipy():
    x = points()
    ref = sum(
        w / 10 * multivariate_normal(m, c).pdf(x.numpy())
        for m, c, w in zip(MEANS, COVS, WEIGHTS, strict=True)
    )
    torch.testing.assert_close(mixture().log_prob(x, full_sigma(0.0)), torch.log(torch.tensor(ref)))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.8])
def test_noised_log_prob_is_the_mixture_of_noised_components(sigma):
    x, a = points(), 1 - sigma
    ref = 0.0
    for m, c, w in zip(MEANS, COVS, WEIGHTS, strict=True):
        cov = a * a * torch.tensor(c, dtype=F64) + sigma**2 * torch.eye(2, dtype=F64)
        ref = ref + w / 10 * multivariate_normal([a * v for v in m], cov).pdf(x.numpy())
    torch.testing.assert_close(mixture().log_prob(x, sigma), torch.log(torch.tensor(ref)))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_is_the_gradient_of_log_prob(sigma):
    gm, x = mixture(), points().requires_grad_()
    (grad,) = torch.autograd.grad(gm.log_prob(x, full_sigma(sigma)).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), full_sigma(sigma)), grad)


@pytest.mark.parametrize("sigma", [s for s in SIGMAS if s > 0])
def test_velocity_obeys_the_path_identities(sigma):
    gm, x, s = mixture(), points(), full_sigma(sigma)
    v, x0 = gm.velocity(x, s), gm.denoise(x, s)
    torch.testing.assert_close(path.score_from_velocity(x, s, v), gm.score(x, s))
    torch.testing.assert_close(path.x0_from_velocity(x, s, v), x0)
    torch.testing.assert_close(path.velocity_from_x0(x, s, x0), v)


def test_velocity_limits_at_the_ends_of_the_path():
    gm, x = mixture(), points()
    # σ = 0: x is x₀ and ε is independent of it, so E[ε − x₀ | x] = −x
    torch.testing.assert_close(gm.velocity(x, full_sigma(0.0)), -x)
    # σ = 1: x is ε, so E[ε − x₀ | x] = x − E[x₀]
    torch.testing.assert_close(gm.velocity(x, full_sigma(1.0)), x - gm.mean)
    torch.testing.assert_close(gm.score(x, full_sigma(1.0)), -x)


def test_exact_samples_noised_match_the_analytic_marginal():
    gm, n = mixture(), 40_000
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    for sigma in (0.0, 0.3, 0.7):
        xs = path.noise(x0, sigma, eps)
        noised = gm.noised(sigma)
        assert_moments(xs, noised.mean, noised.covariance)
        # and the analytic marginal's moments are those of the noising map
        a = 1 - sigma
        torch.testing.assert_close(noised.mean, a * gm.mean)
        torch.testing.assert_close(
            noised.covariance, a * a * gm.covariance + sigma**2 * torch.eye(2, dtype=F64)
        )


def test_log_prob_integrates_to_one_at_every_level():
    u = torch.linspace(-9, 9, 241, dtype=F64)
    grid = torch.cartesian_prod(u, u)
    h = (u[1] - u[0]) ** 2
    for sigma in (0.0, 0.5, 1.0):
        mass = mixture().log_prob(grid, sigma).exp().sum() * h
        torch.testing.assert_close(mass, torch.tensor(1.0, dtype=F64), atol=1e-8, rtol=0)


def test_component_assignment_recovers_the_drawn_mode_when_modes_are_far_apart():
    gm = GaussianMixture([[-10.0, 0.0], [10.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [0.25, 0.75])
    x = gm.sample(4000, torch.Generator().manual_seed(0))
    freq = torch.bincount(gm.assign(x), minlength=2) / 4000
    se = math.sqrt(0.25 * 0.75 / 4000)
    assert abs(freq[0] - 0.25) < 5 * se


def test_sample_moments_and_mode_frequencies():
    gm, n = mixture(), 40_000
    x = gm.sample(n, torch.Generator().manual_seed(2))
    assert x.shape == (n, 2) and x.dtype == F64
    assert_moments(x, gm.mean, gm.covariance)


def test_sampling_is_reproducible_from_the_generator():
    a = mixture().sample(10, torch.Generator().manual_seed(3))
    b = mixture().sample(10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- representations and dtypes ----------------------------------------------------------------


@pytest.mark.parametrize("sigma", SIGMAS)
def test_diagonal_and_full_covariances_agree(sigma):
    var = [[0.3, 1.2], [0.5, 0.05], [2.0, 0.7]]
    diag = GaussianMixture(MEANS, var, WEIGHTS)
    full = GaussianMixture(MEANS, torch.diag_embed(torch.tensor(var, dtype=F64)), WEIGHTS)
    assert diag.diagonal and not full.diagonal
    x, s = points(), full_sigma(sigma)
    for method in ("log_prob", "score", "velocity", "denoise"):
        torch.testing.assert_close(getattr(diag, method)(x, s), getattr(full, method)(x, s))
    torch.testing.assert_close(diag.covariance, full.covariance)


def test_sample_shape_flattens_row_major():
    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, 16, generator=g, dtype=F64)
    var = 0.2 + torch.rand(3, 16, generator=g, dtype=F64)
    shaped = GaussianMixture(means, var, [1, 1, 1], sample_shape=(4, 4))
    flat = GaussianMixture(means, var, [1, 1, 1])
    x, s = points(8, shape=(4, 4)), torch.linspace(0, 1, 8, dtype=F64)
    for method in ("score", "velocity", "denoise"):
        out = getattr(shaped, method)(x, s)
        assert out.shape == (8, 4, 4)
        torch.testing.assert_close(out.reshape(8, 16), getattr(flat, method)(x.reshape(8, 16), s))
    torch.testing.assert_close(shaped.log_prob(x, s), flat.log_prob(x.reshape(8, 16), s))
    assert shaped.sample(5, g).shape == (5, 4, 4) and shaped.mean.shape == (4, 4)


@pytest.mark.parametrize("sigma", [1e-3, 0.5, 1.0])
def test_float32_calls_stay_float32_and_close_to_float64(sigma):
    gm, x = mixture(), points()
    s = full_sigma(sigma)
    for method in ("score", "velocity", "log_prob"):
        ref = getattr(gm, method)(x, s)
        out = getattr(gm, method)(x.float(), s.float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)


def test_scalar_sigma_broadcasts_over_the_batch():
    gm, x = mixture(), points(4)
    torch.testing.assert_close(gm.velocity(x, 0.3), gm.velocity(x, full_sigma(0.3, 4)))


def test_sharp_component_stays_finite_near_sigma_zero():
    gm = GaussianMixture([[0.0, 0.0], [3.0, 0.0]], [[1e-6, 1e-6], [1.0, 1.0]], [0.5, 0.5])
    x = points(32)
    for sigma in (0.0, 1e-4, 1e-3):
        for method in ("score", "velocity", "log_prob"):
            assert torch.isfinite(getattr(gm, method)(x, full_sigma(sigma, 32))).all()


# --- rewards and constraints -------------------------------------------------------------------


def test_rewards_evaluate_their_formulas():
    x = points(16)
    lin = LinearReward([1.0, -2.0], offset=0.5)
    torch.testing.assert_close(lin.log_potential(x), x[:, 0] - 2 * x[:, 1] + 0.5)
    quad = QuadraticReward([[2.0, 0.5], [0.5, 1.0]], center=[0.0, 1.0], offset=3.0)
    r = x - torch.tensor([0.0, 1.0], dtype=F64)
    ref = 3.0 - 0.5 * (2 * r[:, 0] ** 2 + r[:, 0] * r[:, 1] + r[:, 1] ** 2)
    torch.testing.assert_close(quad.log_potential(x), ref)
    sig = SigmoidReward([1.0, 1.0], offset=0.5, sharpness=3.0)
    torch.testing.assert_close(
        sig.log_potential(x), torch.log(torch.sigmoid(3 * (x.sum(-1) - 0.5)))
    )
    for reward in (lin, quad, sig):
        assert check_expert(reward).kind == ExpertKind.DISCRIMINATIVE


def test_sigmoid_reward_saturates_without_overflow():
    sig = SigmoidReward([1.0], sharpness=100.0)
    out = sig.log_potential(torch.tensor([[-1e3], [0.0], [1e3]], dtype=F64))
    torch.testing.assert_close(out, torch.tensor([-1e5, -math.log(2), 0.0], dtype=F64))


def test_half_space_orientation_and_boundary():
    c = HalfSpace([1.0, 1.0], offset=1.0)
    assert check_expert(c).kind == ExpertKind.CONSTRAINT
    x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.5], [-5.0, 5.0]], dtype=F64)
    torch.testing.assert_close(
        c.log_potential(x), torch.tensor([0.0, 0.0, -math.inf, 0.0], dtype=F64)
    )


def test_box_bounds_are_inclusive_and_may_be_infinite():
    box = Box([-1.0, -math.inf], [1.0, 0.0])
    x = torch.tensor([[0.0, -100.0], [1.0, 0.0], [1.01, -1.0], [0.0, 0.1]], dtype=F64)
    torch.testing.assert_close(
        box.log_potential(x), torch.tensor([0.0, 0.0, -math.inf, -math.inf], dtype=F64)
    )
    assert Box(0.0, 1.0, sample_shape=(2, 2)).log_potential(torch.full((1, 2, 2), 0.5)).item() == 0


def test_constraint_potentials_follow_the_input_dtype():
    x = torch.zeros(3, 2)
    assert HalfSpace([1.0, 0.0]).log_potential(x).dtype == torch.float32


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"means": [1.0, 2.0]}, "means"),
        ({"means": [[0.0, 0.0]]}, "covariances"),
        ({"weights": [1.0, 2.0]}, "weights"),
        ({"weights": [1.0, -1.0, 1.0]}, "weights"),
        ({"weights": [1.0, float("nan"), 1.0]}, "weights"),
        ({"weights": [0.0, 0.0, 0.0]}, "weights"),
        ({"covariances": [[[1.0, 2.0], [2.0, 1.0]]] * 3}, "covariances"),
        ({"covariances": [[[1.0, 0.5], [0.0, 1.0]]] * 3}, "covariances"),
        ({"covariances": [[1.0, 0.0]] * 3}, "covariances"),
        ({"covariances": [[[1.0, 0.0], [0.0, 1.0]]] * 2}, "covariances"),
        ({"means": [["a", 0.0]] * 3}, "means"),
        ({"sample_shape": (3,)}, "sample_shape"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bad_parameters_name_their_field(kwargs, field):
    params = {"means": MEANS, "covariances": COVS, "weights": WEIGHTS} | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        GaussianMixture(**params)


@pytest.mark.parametrize(
    ("x", "sigma", "field"),
    [
        (torch.zeros(4, 3), 0.5, "x"),
        (torch.zeros(4), 0.5, "x"),
        (torch.zeros(4, 2, dtype=torch.long), 0.5, "x"),
        (torch.zeros(9, 2), 0.5, "x"),
        (torch.zeros(4, 2), torch.zeros(3), "sigma"),
        (torch.zeros(4, 2), 1.5, "sigma"),
        (torch.zeros(4, 2), -0.1, "sigma"),
        (torch.zeros(4, 2), float("nan"), "sigma"),
    ],
)
def test_bad_calls_name_their_field(x, sigma, field):
    gm = mixture(max_batch=8)
    for method in (gm.velocity, gm.score, gm.log_prob, gm.denoise):
        with pytest.raises(ValueError, match=f"^{field}:"):
            method(x, sigma)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LinearReward([0.0, 0.0]), "direction"),
        (lambda: LinearReward([1.0, 0.0], offset=[1.0, 2.0]), "offset"),
        (lambda: QuadraticReward([[1.0, 2.0], [0.0, 1.0]]), "precision"),
        (lambda: QuadraticReward([1.0, 1.0], center=[1.0, 2.0, 3.0]), "center"),
        (lambda: SigmoidReward([1.0, 0.0], sharpness=0.0), "sharpness"),
        (lambda: HalfSpace([0.0, 0.0]), "normal"),
        (lambda: HalfSpace([1.0, 0.0], offset=float("inf")), "offset"),
        (lambda: Box([0.0, 1.0], [1.0, 1.0]), "high"),
        (lambda: Box([0.0, float("nan")], [1.0, 1.0]), "low"),
        (lambda: Box(0.0, 1.0), "sample_shape"),
    ],
)
def test_bad_reward_and_constraint_parameters_name_their_field(build, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        build()


def test_rewards_and_constraints_check_x0():
    for expert in (
        LinearReward([1.0, 0.0]),
        QuadraticReward([1.0, 1.0]),
        HalfSpace([1.0, 0.0]),
        Box(0.0, 1.0, sample_shape=(2,)),
    ):
        with pytest.raises(ValueError, match=r"^x0:"):
            expert.log_potential(torch.zeros(4, 3))


# --- helpers -----------------------------------------------------------------------------------


def assert_moments(samples, mean, cov, z=5.0):
    """Sample mean and covariance within z Monte Carlo standard errors of the exact ones."""
    n = samples.shape[0]
    x = samples.reshape(n, -1)
    mean, cov = mean.reshape(-1), cov.reshape(x.shape[1], x.shape[1])
    se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() <= z * se).all(), (x.mean(0), mean, se)
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= z * se + 1e-12).all(), (prods.mean(0), cov, se)


# --- properties over random mixtures -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 4),
    st.integers(1, 5),
    st.booleans(),
    st.floats(0.0, 1.0),
)
def test_identities_hold_for_random_mixtures(seed, k, d, diagonal, sigma):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(k, d, generator=g, dtype=F64)
    if diagonal:
        cov = 0.05 + torch.rand(k, d, generator=g, dtype=F64)
    else:
        f = torch.randn(k, d, d, generator=g, dtype=F64)
        cov = f @ f.mT / d + 0.05 * torch.eye(d, dtype=F64)
    gm = GaussianMixture(means, cov, torch.rand(k, generator=g, dtype=F64) + 0.1)
    x = 2 * torch.randn(16, d, generator=g, dtype=F64)
    s = torch.full((16,), sigma, dtype=F64)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gm.log_prob(xg, s).sum(), xg)
    score = gm.score(x, s)
    torch.testing.assert_close(score, grad)
    if sigma > 1e-6:
        v = gm.velocity(x, s)
        torch.testing.assert_close(path.score_from_velocity(x, s, v), score, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(path.x0_from_velocity(x, s, v), gm.denoise(x, s))
