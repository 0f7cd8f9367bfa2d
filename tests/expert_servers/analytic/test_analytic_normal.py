"""Tail-safe 1-D normal helpers against scipy and mpmath references."""

import math

import mpmath
import pytest
import scipy.special as sp
import torch
from scipy.stats import kstest, truncnorm

from poegen.expert_servers.analytic.normal import (
    log_ndtr_diff,
    log_ndtri,
    truncnorm_moments,
    truncnorm_sample,
)

F64 = torch.float64
INF = math.inf


def test_log_ndtri_inverts_log_ndtr_down_to_extreme_tails():
    log_p = torch.tensor(
        [-1e6, -1e4, -800.0, -745.0, -700.0, -50.0, -1.0, -1e-3, -1e-12], dtype=F64
    )
    ref = torch.tensor(sp.ndtri_exp(log_p.numpy()))
    torch.testing.assert_close(log_ndtri(log_p), ref, rtol=1e-12, atol=1e-12)


def test_log_ndtri_float32_reaches_below_the_float32_range():
    log_p = torch.tensor([-500.0, -90.0, -80.0, -2.0])
    ref = torch.tensor(sp.ndtri_exp(log_p.double().numpy()), dtype=torch.float32)
    torch.testing.assert_close(log_ndtri(log_p), ref, rtol=1e-5, atol=1e-5)


def mp_log_diff(a, b):
    """log(Φ(b) − Φ(a)) in 60-digit arithmetic (mirrored into the lower tail first)."""
    if a > 0:
        a, b = -b, -a
    with mpmath.workdps(60):
        return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (-INF, 0.0),
        (-INF, -40.0),
        (30.0, INF),
        (-50.0, -49.0),
        (8.0, 8.5),
        (-1.0, 1.0),
        (2.0, 2.0 + 1e-6),
    ],
)
def test_log_ndtr_diff_is_accurate_in_both_tails(a, b):
    out = log_ndtr_diff(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
    assert out.item() == pytest.approx(mp_log_diff(a, b), rel=1e-10)


@pytest.mark.parametrize(
    ("a", "b"), [(-INF, -40.0), (30.0, INF), (-50.0, -49.0), (-1.0, 1.0), (-INF, 0.3), (2.0, 2.5)]
)
def test_truncnorm_moments_match_scipy(a, b):
    mean, var = truncnorm_moments(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
    ref_mean, ref_var = truncnorm.stats(a, b, moments="mv")
    assert mean.item() == pytest.approx(float(ref_mean), rel=1e-9)
    assert var.item() == pytest.approx(float(ref_var), rel=1e-6)


@pytest.mark.parametrize(("a", "b"), [(-INF, -40.0), (30.0, INF), (-50.0, -49.9), (8.0, 8.01)])
def test_truncnorm_samples_stay_in_deep_tail_intervals(a, b):
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=F64).clamp_min(1e-300)
    z = truncnorm_sample(torch.full_like(u, a), torch.full_like(u, b), u)
    assert torch.isfinite(z).all() and (z >= a).all() and (z <= b).all()


@pytest.mark.parametrize(("a", "b"), [(-INF, 0.5), (-1.0, 2.0), (1.5, INF), (-4.0, -3.0)])
def test_truncnorm_samples_follow_the_truncated_law(a, b):
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(1), dtype=F64)
    z = truncnorm_sample(torch.full_like(u, a), torch.full_like(u, b), u)
    assert kstest(z.numpy(), truncnorm(a, b).cdf).pvalue > 1e-3
