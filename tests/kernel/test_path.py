"""The rectified-flow identities against a Gaussian, where every quantity is exact."""

import torch

from poegen.kernel import path


def _gaussian_case(sigma: float, seed: int = 0):
    """x_0 ~ N(μ, s²I): the exact posterior mean E[x_0|x_σ] and score of p_σ."""
    g = torch.Generator().manual_seed(seed)
    mu, s2 = torch.tensor([0.7, -1.3], dtype=torch.float64), 0.4
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    var = (1 - sigma) ** 2 * s2 + sigma**2
    score = -(x - (1 - sigma) * mu) / var
    x0 = mu + (1 - sigma) * s2 / var * (x - (1 - sigma) * mu)
    return x, x0, score


def test_score_from_velocity_matches_the_exact_gaussian_score():
    for sigma in (0.02, 0.3, 0.7, 1.0):
        x, x0, score = _gaussian_case(sigma)
        v = path.velocity_from_x0(x, sigma, x0)
        torch.testing.assert_close(path.score_from_velocity(x, sigma, v), score)
        torch.testing.assert_close(path.x0_from_velocity(x, sigma, v), x0)


def test_velocity_and_score_round_trip_below_sigma_one():
    x, _x0, score = _gaussian_case(0.45)
    v = path.velocity_from_score(x, 0.45, score)
    torch.testing.assert_close(path.score_from_velocity(x, 0.45, v), score)


def test_noise_estimate_reconstructs_x():
    x, x0, _ = _gaussian_case(0.6)
    v = path.velocity_from_x0(x, 0.6, x0)
    eps = path.noise_from_velocity(x, 0.6, v)
    torch.testing.assert_close(path.noise(x0, 0.6, eps), x)


def test_per_sample_sigma_broadcasts_over_trailing_dims():
    x = torch.ones(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    v = torch.ones_like(x)
    out = path.x0_from_velocity(x, sigma, v)
    torch.testing.assert_close(out[:, 0, 0, 0], 1 - sigma)


def test_euler_step_to_zero_lands_on_x0():
    x, x0, _ = _gaussian_case(0.3)
    v = path.velocity_from_x0(x, 0.3, x0)
    torch.testing.assert_close(path.euler_step(x, 0.3, 0.0, v), x0)
