"""Log-space weights, ESS and the five resamplers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poegen.kernel import particles
from poegen.kernel.particles import RESAMPLERS, resample

log_weight_lists = st.lists(st.floats(-30, 30), min_size=1, max_size=64)


@given(log_weight_lists, st.integers(0, 2**32 - 1))
def test_systematic_counts_within_one_of_n_w(log_w, seed):
    log_w = torch.tensor(log_w, dtype=torch.float64)
    idx = particles.systematic(log_w, len(log_w), generator=torch.Generator().manual_seed(seed))
    excess = torch.bincount(idx, minlength=len(log_w)) - len(log_w) * log_w.softmax(0)
    assert (excess.abs() <= 1 + 1e-9).all()


@given(log_weight_lists, st.integers(0, 2**32 - 1))
def test_ssp_and_residual_counts_are_floor_or_more(log_w, seed):
    log_w = torch.tensor(log_w, dtype=torch.float64)
    n = len(log_w)
    floor = torch.floor(n * log_w.softmax(0) - 1e-9)
    for scheme in ("ssp", "residual"):
        idx = resample(scheme, log_w, n, generator=torch.Generator().manual_seed(seed))
        counts = torch.bincount(idx, minlength=n)
        assert counts.sum() == n
        assert (counts >= floor - 1e-9).all(), scheme
    counts = torch.bincount(
        particles.ssp(log_w, n, generator=torch.Generator().manual_seed(seed)), minlength=n
    )
    assert (counts <= torch.ceil(n * log_w.softmax(0) + 1e-9)).all()


@given(
    st.sampled_from(sorted(RESAMPLERS)), log_weight_lists, st.integers(1, 50), st.integers(0, 99)
)
@settings(max_examples=60)
def test_every_scheme_returns_n_sorted_valid_ancestors(scheme, log_w, n, seed):
    log_w = torch.tensor(log_w, dtype=torch.float64)
    idx = resample(scheme, log_w, n, generator=torch.Generator().manual_seed(seed))
    assert idx.shape == (n,) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < len(log_w))).all()
    assert (idx[1:] >= idx[:-1]).all()


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_offspring_counts_have_expectation_n_w(scheme):
    """Mean counts over R draws within 4 standard errors of n·W (multinomial bounds the SE)."""
    g = torch.Generator().manual_seed(1)
    log_w = torch.tensor([0.0, -1.0, 2.0, -30.0, 0.5, 1.5, -0.2, 0.3], dtype=torch.float64)
    n, reps = 8, 2000
    w = log_w.softmax(0)
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(reps):
        counts += torch.bincount(resample(scheme, log_w, n, generator=g), minlength=8)
    se = torch.sqrt(n * w * (1 - w) / reps)
    assert ((counts / reps - n * w).abs() <= 4 * se + 1e-3).all()


def test_zero_weights_never_resampled_and_cumsum_below_one_is_safe():
    log_w = torch.tensor([-torch.inf, 0.0, -torch.inf, float("nan")], dtype=torch.float32)
    for scheme in RESAMPLERS:
        idx = resample(scheme, log_w, 100, generator=torch.Generator().manual_seed(0))
        assert (idx == 1).all(), scheme


def test_all_dead_cannot_be_resampled():
    with pytest.raises(ValueError, match="log_w"):
        particles.systematic(torch.full((4,), -torch.inf), 4, generator=torch.Generator())


def test_unknown_scheme_names_the_field():
    with pytest.raises(ValueError, match="resampling: unknown scheme 'bogus'"):
        resample("bogus", torch.zeros(3), 3, generator=torch.Generator())


def test_ess_fraction_in_log_space():
    assert particles.ess_fraction(torch.zeros(10)) == pytest.approx(1.0)
    assert particles.ess_fraction(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1 / 3)
    assert particles.ess_fraction(torch.tensor([1000.0, 1000.0])) == pytest.approx(
        1.0
    )  # no overflow
    assert particles.ess_fraction(torch.full((3,), -math.inf)) == 0.0
    assert particles.ess_fraction(torch.tensor([0.0, float("nan")])) == pytest.approx(0.5)


def test_normalize_and_increment_keep_dead_particles_dead():
    log_w = particles.normalize(torch.tensor([3.0, 3.0, -math.inf], dtype=torch.float64))
    assert torch.logsumexp(log_w, 0) == pytest.approx(0.0)
    inc = particles.log_increment(torch.tensor([1.0, 2.0]), torch.tensor([-math.inf, 0.5]))
    assert inc[0] == -math.inf and inc[1] == 1.5


def _particles_package():
    import particles.resampling  # the [dev] extra installs it: a CPU oracle for our schemes

    return particles.resampling


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual", "multinomial", "ssp"])
def test_offspring_distribution_matches_the_particles_package(scheme):
    """Mean and variance of each particle's offspring count agree with `particles`' schemes."""
    rs = _particles_package()
    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.ones(6))
    log_w = torch.tensor(np.log(w))
    n, reps = 6, 3000
    ours = torch.stack(
        [
            torch.bincount(
                resample(scheme, log_w, n, generator=torch.Generator().manual_seed(r)), minlength=6
            )
            for r in range(reps)
        ]
    ).double()
    np.random.seed(7)  # the package draws from NumPy's global generator
    theirs = torch.tensor(
        np.stack([np.bincount(getattr(rs, scheme)(w, M=n), minlength=6) for _ in range(reps)])
    ).double()
    se_mean = torch.sqrt(ours.var(0) / reps + theirs.var(0) / reps)
    assert ((ours.mean(0) - theirs.mean(0)).abs() <= 4 * se_mean + 1e-9).all()
    # variances: compare within 25 % + small absolute slack (they are the same law)
    assert torch.allclose(ours.var(0), theirs.var(0), rtol=0.25, atol=0.01)
