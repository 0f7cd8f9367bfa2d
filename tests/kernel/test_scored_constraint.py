"""A constraint that announces SCORE joins the sampler's MCMC target (its exact noised score and
log-density), in-process and over the wire (``Score``, ``LogProb`` with σ)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.remote import LoopThread

from poegen.expert_servers.analytic import GaussianMixture, LinearReward
from poegen.expert_servers.masked import MaskedTarget
from poegen.kernel.experts import Capability, ExpertInfo
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings

REF, W = 2.0, 4.0  # tie x_0 to 2 with weight 4: x_0 ~ N(w·r/(1+w), 1/(1+w)) under N(0, I)


def _prior() -> GaussianMixture:
    return GaussianMixture([[0.0, 0.0]], [[1.0, 1.0]], [1.0], name="prior")


def _tie(**kw: object) -> MaskedTarget:
    return MaskedTarget([REF, 0.0], [1.0, 0.0], W, name="tie", propose=False, **kw)


def _run(
    tie: object, mcmc_steps: int, mcmc: str = "mala", seed: int = 0, transition: str = "euler"
) -> torch.Tensor:
    settings = SamplerSettings(
        num_particles=2000, num_steps=20, mcmc_steps=mcmc_steps, mcmc=mcmc, transition=transition
    )
    factors = [Factor(_prior()), Factor(tie)]  # type: ignore[arg-type]
    result = sample(factors, (2,), settings, generator=torch.Generator().manual_seed(seed))
    if transition == "euler":  # no potential, no corrector: no weights
        assert torch.allclose(result.log_weights, result.log_weights[:1])
        return result.particles
    return result.draws(2000, generator=torch.Generator().manual_seed(seed))


def test_under_fk_the_tie_is_weighed_and_the_product_is_reached_without_moves() -> None:
    """FK: w_c·(log q_c,σ' − log q_c,σ) in the weights makes the set target the product at every
    level, so no move is needed (draws from the weighted set)."""
    mean, var = W * REF / (1 + W), 1 / (1 + W)
    for steps in (0, 4):
        x = _run(_tie(score=True), mcmc_steps=steps, mcmc="ula", transition="fk")
        assert x[:, 0].mean().item() == pytest.approx(mean, abs=0.08)
        assert x[:, 0].var().item() == pytest.approx(var, rel=0.2)
        assert x[:, 1].var().item() == pytest.approx(1.0, rel=0.15)


class ScoreOnly(MaskedTarget):
    def describe(self) -> ExpertInfo:
        info = super().describe()
        return dataclasses.replace(info, capabilities=frozenset({Capability.SCORE}))


def test_fk_refuses_a_scored_constraint_without_its_log_density() -> None:
    settings = SamplerSettings(num_particles=4, num_steps=5, mcmc="ula", transition="fk")
    tie = ScoreOnly([REF, 0.0], [1.0, 0.0], W, propose=False)
    factors = [Factor(_prior()), Factor(tie)]
    with pytest.raises(ValueError, match="transition: 'fk' weighs the scored constraint"):
        sample(factors, (2,), settings, generator=torch.Generator().manual_seed(0))


def test_under_euler_the_scored_tie_acts_inside_the_moves_and_reaches_the_exact_product() -> None:
    mean, var = W * REF / (1 + W), 1 / (1 + W)
    moved = _run(_tie(score=True), mcmc_steps=8)
    assert moved[:, 0].mean().item() == pytest.approx(mean, abs=0.06)
    assert moved[:, 0].var().item() == pytest.approx(var, rel=0.15)
    assert moved[:, 1].var().item() == pytest.approx(1.0, rel=0.1)  # untouched coordinate
    # the transition never sees the tie: without moves the prior comes out
    still = _run(_tie(score=True), mcmc_steps=0)
    assert abs(still[:, 0].mean().item()) < 0.1


@pytest.mark.parametrize("mcmc_steps", [0, 2])
@pytest.mark.parametrize("transition", ["euler", "fk"])
def test_the_tie_is_called_only_when_something_reads_it(mcmc_steps: int, transition) -> None:
    settings = SamplerSettings(
        num_particles=4, num_steps=5, mcmc_steps=mcmc_steps, mcmc="ula", transition=transition
    )
    factors = [Factor(_prior()), Factor(_tie(score=True))]  # type: ignore[arg-type]
    result = sample(factors, (2,), settings, generator=torch.Generator().manual_seed(0))
    tie_calls = sum(level.experts["tie"].calls for level in result.trace)
    prior_calls = sum(level.experts["prior"].calls for level in result.trace)
    # π_σ is evaluated at the start, after each transition and after each move; the prior
    # answers every evaluation; the tie's score only when a move will read it, its log-density
    # at every evaluation under FK (the weights read it)
    evaluations = 1 + len(result.trace) * (1 + mcmc_steps)
    assert prior_calls == evaluations
    reads = (mcmc_steps > 0) + (transition == "fk")
    assert tie_calls == reads * evaluations


def test_mala_needs_the_log_density_of_a_scored_constraint() -> None:
    tie = ScoreOnly([REF, 0.0], [1.0, 0.0], W, propose=False)
    with pytest.raises(ValueError, match="log_prob from the scored constraint"):
        _run(tie, mcmc_steps=2, mcmc="mala")
    assert _run(tie, mcmc_steps=2, mcmc="ula").shape == (2000, 2)


def test_a_served_scored_constraint_gives_identical_samples(loop: LoopThread) -> None:
    local = _run(_tie(score=True), mcmc_steps=3)
    served = loop.serve(_tie(score=True))
    with RemoteExpert.connect(served.address) as remote:
        info = remote.describe()
        assert info.supports(Capability.SCORE) and info.supports(Capability.LOG_PROB)
        far = _run(remote, mcmc_steps=3)
        far_fk = _run(remote, mcmc_steps=3, mcmc="ula", transition="fk")
        x, sigma = torch.randn(3, 2), torch.full((3,), 0.5)
        assert torch.equal(remote.score(x, sigma), _tie().score(x, sigma))
        assert torch.equal(remote.log_prob(x, sigma), _tie().log_prob(x, sigma))
        assert torch.equal(remote.log_potential(x), _tie().log_potential(x))
    assert torch.equal(local, far)
    assert torch.equal(_run(_tie(score=True), mcmc_steps=3, mcmc="ula", transition="fk"), far_fk)


def test_score_errors_name_the_field(loop: LoopThread) -> None:
    reward = loop.serve(LinearReward([1.0, 0.0], name="reward"))
    with RemoteExpert.connect(reward.address) as remote:
        with pytest.raises(RemoteExpertError) as none:
            remote.score(torch.zeros(2, 2), torch.full((2,), 0.5))
        assert none.value.code == Code.FAILED_PRECONDITION
        with pytest.raises(RemoteExpertError) as sigma:
            remote.log_prob(torch.zeros(2, 2), torch.full((2,), 0.5))
        assert (sigma.value.code, sigma.value.field) == (Code.INVALID_ARGUMENT, "sigma")
    tie = loop.serve(_tie(score=True))
    with RemoteExpert.connect(tie.address) as remote:
        with pytest.raises(RemoteExpertError) as bad:
            remote.score(torch.zeros(2, 2), torch.full((2,), 1.5))
        assert (bad.value.code, bad.value.field) == (Code.INVALID_ARGUMENT, "sigma")
        assert remote.score(torch.zeros(2, 2), torch.full((2,), 0.5)).shape == (2, 2)
