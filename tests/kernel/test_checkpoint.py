"""A run resumed from any level's checkpoint ends exactly where the uninterrupted run ends.

Each case stops a run after level k (closing its iterator, as a killed job would), starts a
fresh ``sample_iter`` with ``resume=`` that level's checkpoint and a fresh generator, and
compares every output bit for bit: the checkpoint carries the particles, the target's
evaluation at them, the weights, the potentials, the evidence, the tempering and step-size
scales and the generator's state, which is all the loop carries from one level to the next.
"""

from __future__ import annotations

import pytest
import torch
from helpers.remote import Jitter

from poegen.expert_servers.analytic import GaussianMixture, HalfSpace, LinearReward
from poegen.kernel import Factor, KernelError, SamplerSettings, sample, sample_iter
from poegen.kernel.sampler import SampleResult

MIX = GaussianMixture([[-1.0, 0.0], [1.5, 0.5]], [[0.4, 0.4], [0.3, 0.3]], [0.4, 0.6])
PRIOR = GaussianMixture([[0.0, 0.0]], [[2.0, 2.0]], [1.0], name="prior")

CASES = {
    "ula-reward": (dict(), [Factor(MIX), Factor(LinearReward([1.0, 0.0]), weight=2.0)]),
    "mala-fk-adapted": (
        dict(mcmc="mala", transition="fk", sde_noise=0.5),
        [Factor(MIX), Factor(PRIOR, weight=0.5)],
    ),
    "hmc-adaptive-tempering": (
        dict(mcmc="hmc", leapfrog_steps=3, tempering="adaptive"),
        [Factor(MIX), Factor(LinearReward([0.0, 1.0]), weight=3.0)],
    ),
    "uhmc-constraint": (
        dict(mcmc="uhmc", leapfrog_steps=2, damping=0.5),
        [Factor(MIX), Factor(HalfSpace([1.0, 1.0], offset=2.0))],
    ),
    "proposals-always-resampled": (
        dict(ess_threshold=1.0, resampling="ssp"),
        [Factor(MIX), Factor(Jitter())],
    ),
}


def _settings(overrides: dict) -> SamplerSettings:
    return SamplerSettings(**(dict(num_particles=32, num_steps=8, mcmc_steps=2) | overrides))


def _whole(factors, settings) -> SampleResult:
    return sample(factors, (2,), settings, generator=torch.Generator().manual_seed(5))


def _same(a: SampleResult, b: SampleResult) -> None:
    assert torch.equal(a.particles, b.particles)
    assert torch.equal(a.log_weights, b.log_weights)
    assert a.log_evidence == b.log_evidence and a.best_index == b.best_index


@pytest.mark.parametrize("case", list(CASES))
def test_resuming_after_any_level_gives_the_uninterrupted_result(case):
    overrides, factors = CASES[case]
    settings = _settings(overrides)
    whole = _whole(factors, settings)
    levels = len(whole.trace)
    for stop_after in (1, levels // 2, levels):
        run = sample_iter(factors, (2,), settings, generator=torch.Generator().manual_seed(5))
        saved = [next(run) for _ in range(stop_after)][-1].checkpoint
        run.close()  # the job is gone; only its checkpoint remains
        assert saved is not None and saved.levels_done == stop_after
        resumed = sample(
            factors, (2,), settings, generator=torch.Generator().manual_seed(999), resume=saved
        )
        _same(resumed, whole)
        # the resumed run's trace holds the levels it ran, equal to the uninterrupted ones
        assert [t.step for t in resumed.trace] == list(range(stop_after, levels))
        for a, b in zip(resumed.trace, whole.trace[stop_after:], strict=True):
            assert (a.ess, a.log_evidence, a.reward_scale) == (
                b.ess,
                b.log_evidence,
                b.reward_scale,
            )


def test_a_checkpoint_of_another_run_is_refused_naming_resume():
    factors = [Factor(MIX)]
    run = sample_iter(factors, (2,), _settings({}), generator=torch.Generator().manual_seed(0))
    saved = next(run).checkpoint
    run.close()
    generator = torch.Generator()
    with pytest.raises(KernelError, match="resume: particles") as bigger:
        sample(factors, (2,), _settings({"num_particles": 64}), generator=generator, resume=saved)
    assert bigger.value.field == "resume"
    fewer_levels = SamplerSettings(num_particles=32, num_steps=2, mcmc_steps=2)
    deep = sample_iter(factors, (2,), _settings({}), generator=torch.Generator().manual_seed(0))
    late = [next(deep) for _ in range(3)][-1].checkpoint
    deep.close()
    with pytest.raises(KernelError, match=r"resume: levels_done 3 outside 1\.\.1"):
        sample(factors, (2,), fewer_levels, generator=generator, resume=late)
