"""The sampler loop: determinism, traces, settings errors, regions, kernels, constraints."""

import dataclasses
import itertools
import math

import pytest
import torch

from poegen.expert_servers.analytic import GaussianMixture, HalfSpace, LinearReward
from poegen.kernel import (
    AllParticlesDiedError,
    Capability,
    ExpertInfo,
    ExpertKind,
    Factor,
    SamplerSettings,
    create_expert,
    sample,
    sample_iter,
)
from poegen.kernel.schedule import reward_scales, shifted_sigmas, sigmas_for

F64 = torch.float64

FAST = dict(num_particles=64, num_steps=10, mcmc_steps=2)


def gaussian(mean, var=1.0, name="gaussian"):
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return GaussianMixture(mean[None], torch.full((1, mean.numel()), var), [1.0], name=name)


def run(factors, shape=(2,), seed=0, **settings):
    return sample(
        factors,
        shape,
        SamplerSettings(**(FAST | settings)),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
    )


def weighted_moments(result):
    w = result.weights[:, None]
    mean = (w * result.particles).sum(0)
    var = (w * (result.particles - mean) ** 2).sum(0)
    return mean, var


# --- determinism, results, traces ----------------------------------------------------------


def test_same_seed_same_result_other_seed_differs():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=0.5)]
    a, b, c = run(factors, seed=3), run(factors, seed=3), run(factors, seed=4)
    assert torch.equal(a.particles, b.particles) and torch.equal(a.log_weights, b.log_weights)
    assert a.log_evidence == b.log_evidence and a.best_index == b.best_index
    assert not torch.equal(a.particles, c.particles)


def test_result_and_trace_contents():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=1.0)]
    result = run(factors)
    assert result.particles.shape == (64, 2) and result.log_weights.shape == (64,)
    assert torch.logsumexp(result.log_weights, 0) == pytest.approx(0.0, abs=1e-9)
    assert (
        len(result.trace) == 9
    )  # the shifted grid of 10 steps has 9 levels strictly inside (0, 1)
    level = result.trace[1]
    # ULA has no MH test of its own; with a reward, its moves pass the potential stage
    assert 0 < level.ess <= 1 and 0 < level.acceptance <= 1
    # per level: one velocity after the transition, one per ULA step; one reward call
    # (level 0 also carries the first velocity at σ = 1)
    assert result.trace[0].experts["gaussian"].calls == 1 + 1 + 2
    assert level.experts["gaussian"].calls == 1 + 2
    assert level.experts["linear_reward"].calls == 1 + 2  # the weights, then one per move
    assert level.experts["gaussian"].seconds >= 0
    assert result.trace[-1].reward_scale == 1.0
    assert result.best.shape == (2,)
    assert [r.name for r in result.experts] == ["gaussian", "linear_reward"]
    assert result.experts[0].model_id == "analytic" and result.experts[0].revision


def test_callback_and_iterator_see_every_level():
    factors = [Factor(gaussian([0.0, 0.0]))]
    events = []
    result = sample(
        factors, (2,), SamplerSettings(**FAST), generator=torch.Generator().manual_seed(0),
        callback=events.append,
    )  # fmt: skip
    assert [e.step for e in events] == list(range(len(result.trace)))
    run_iter = sample_iter(factors, (2,), SamplerSettings(**FAST), generator=torch.Generator())
    first = next(run_iter)
    assert first.step == 0 and first.preview.shape == (2,)
    run_iter.close()  # stopping early is allowed and releases the worker threads


def test_max_batch_chunks_calls():
    factors = [Factor(gaussian([0.0, 0.0]))]
    result = run(factors, max_batch=16)
    assert result.trace[1].experts["gaussian"].calls == (1 + 2) * 4
    assert result.trace[1].experts["gaussian"].samples == (1 + 2) * 64
    unchunked = run(factors)
    torch.testing.assert_close(result.particles, unchunked.particles)


def test_expert_max_batch_is_honoured():
    expert = GaussianMixture([[0.0, 0.0]], [[1.0, 1.0]], [1.0], max_batch=10)
    result = run([Factor(expert)])
    assert result.trace[1].experts["gaussian_mixture"].calls == (1 + 2) * 7


# --- exactness on Gaussians ------------------------------------------------------------------


@pytest.mark.parametrize("mcmc_steps", [0, 5])
def test_product_of_two_gaussians_euler_needs_the_mcmc_fk_does_not(mcmc_steps):
    """N(0, 1) × N(2, 1) = N(1, ½): averaging the flows (Euler) gives variance ≈ 1 and needs
    the moves; the FK transition's weights reach N(1, ½) with or without them. Without moves
    the FK run does not resample (ESS threshold 0): resampled copies would only be separated by
    the step's small noise, so the weights alone are tested, to their Monte Carlo error."""
    factors = [Factor(gaussian([0.0, 0.0], name="a")), Factor(gaussian([2.0, 2.0], name="b"))]
    common = dict(num_particles=4000, num_steps=40, mcmc_steps=mcmc_steps, schedule="linear")
    euler = weighted_moments(run(factors, transition="euler", **common))
    fk_settings = common | {"transition": "fk"} | ({} if mcmc_steps else {"ess_threshold": 0.0})
    fk = run(factors, **fk_settings)
    ess = float(1 / fk.weights.square().sum())
    moments = [(weighted_moments(fk), 4 * math.sqrt(0.5 / ess) + 0.01)]
    if mcmc_steps:
        moments.append((euler, 0.06))
    exact = (torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64))
    for (mean, var), tol in moments:
        torch.testing.assert_close(mean, exact[0], atol=tol, rtol=0)
        torch.testing.assert_close(var, exact[1], atol=max(tol, 0.06), rtol=0)
    if not mcmc_steps:
        assert (euler[1] > 0.85).all()


def test_mcmc_steps_zero_is_plain_euler_on_the_averaged_velocity():
    a = gaussian([0.0, 0.0], name="a")
    b = gaussian([2.0, -1.0], name="b")
    settings = SamplerSettings(
        num_particles=32, num_steps=8, mcmc_steps=0, schedule="linear", transition="euler"
    )
    result = sample(
        [Factor(a, weight=0.25), Factor(b, weight=0.75)], (2,), settings,
        generator=torch.Generator().manual_seed(5), dtype=torch.float64,
    )  # fmt: skip
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigmas = sigmas_for(settings).tolist()
    for s, s_next in itertools.pairwise(sigmas):
        sig = torch.full((32,), s, dtype=torch.float64)
        v = 0.25 * a.velocity(x, sig) + 0.75 * b.velocity(x, sig)
        x = x + (s_next - s) * v
    torch.testing.assert_close(result.particles, x)


def test_regional_experts_multiply_on_their_coordinates():
    """Global N(0, I) × N(3, 1) on coordinate 0 only: coordinate 0 is N(1.5, ½), 1 is N(0, 1)."""
    region = torch.tensor([1.0, 0.0])
    factors = [
        Factor(gaussian([0.0, 0.0], name="global")),
        Factor(gaussian([3.0, 3.0], name="left"), region=region),
    ]
    result = run(factors, num_particles=4000, num_steps=40, mcmc_steps=5, schedule="linear")
    mean, var = weighted_moments(result)
    torch.testing.assert_close(
        mean, torch.tensor([1.5, 0.0], dtype=torch.float64), atol=0.07, rtol=0
    )
    torch.testing.assert_close(
        var, torch.tensor([0.5, 1.0], dtype=torch.float64), atol=0.07, rtol=0
    )


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_mh_kernels_decide_per_particle(kernel):
    factors = [Factor(gaussian([0.0, 0.0], name="a")), Factor(gaussian([2.0, 2.0], name="b"))]
    big = run(factors, mcmc=kernel, step_size=3.0, num_particles=256)
    small = run(factors, mcmc=kernel, step_size=1e-4, num_particles=256)
    rates = [level.acceptance for level in big.trace]
    # a per-particle decision gives fractional rates; a batch-wide one only 0 or 1
    assert any(0.05 < r < 0.95 for r in rates)
    assert all(0 <= r <= 1 for r in rates)
    assert min(level.acceptance for level in small.trace) > 0.9


def test_mala_matches_the_gaussian_product():
    factors = [Factor(gaussian([0.0, 0.0], name="a")), Factor(gaussian([2.0, 2.0], name="b"))]
    result = run(
        factors, mcmc="mala", num_particles=4000, num_steps=40, mcmc_steps=5, schedule="linear"
    )
    mean, var = weighted_moments(result)
    torch.testing.assert_close(
        mean, torch.tensor([1.0, 1.0], dtype=torch.float64), atol=0.06, rtol=0
    )
    torch.testing.assert_close(
        var, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.06, rtol=0
    )


def test_linear_tilt_of_a_gaussian_is_exact():
    """N(0, 1)·exp(λx₀) = N(λ, 1); log Z = λ²/2 (λ = 0.7, SE of the mean ≈ 0.02)."""
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=0.7)]
    result = run(factors, num_particles=4000, num_steps=50, mcmc_steps=2, schedule="linear")
    mean, var = weighted_moments(result)
    assert mean[0] == pytest.approx(0.7, abs=0.08) and mean[1] == pytest.approx(0.0, abs=0.08)
    assert var[0] == pytest.approx(1.0, abs=0.1)
    assert result.log_evidence == pytest.approx(0.7**2 / 2, abs=0.05)


@pytest.mark.parametrize("tempering", ["constant", "linear", "exponential", "adaptive"])
def test_every_tempering_schedule_ends_at_the_exact_tilt(tempering):
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=0.7)]
    result = run(
        factors, num_particles=3000, num_steps=40, mcmc_steps=2, schedule="linear",
        tempering=tempering,
    )  # fmt: skip
    mean, _ = weighted_moments(result)
    assert result.trace[-1].reward_scale == 1.0
    scales = [level.reward_scale for level in result.trace]
    assert scales == sorted(scales)  # never decreases
    assert mean[0] == pytest.approx(0.7, abs=0.1)


def test_reward_scale_schedules():
    s = SamplerSettings
    assert reward_scales(s(tempering="linear"), 4).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert reward_scales(s(tempering="constant"), 3).tolist() == [1.0, 1.0, 1.0]
    exp = reward_scales(s(tempering="exponential", tempering_rate=0.1), 3).tolist()
    assert exp == pytest.approx([0.1, 0.21, 1.0])
    shifted = shifted_sigmas(4, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted[1:] < shifted[:-1]).all()


def test_ess_threshold_semantics():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=1.0)]
    never = run(factors, ess_threshold=0.0)
    always = run(factors, ess_threshold=1.0)
    assert not any(level.resampled for level in never.trace)
    assert all(level.resampled for level in always.trace)
    # carried weights: without resampling the final spread reflects the whole tilt
    assert never.trace[-1].log_weight_spread > never.trace[0].log_weight_spread


def test_paper_preset_resamples_every_level_and_reports_the_best():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(LinearReward([1.0, 0.0]), weight=1.0)]
    result = sample(factors, (2,), SamplerSettings.paper(**FAST), generator=torch.Generator())
    assert all(level.resampled for level in result.trace)
    assert result.best[0] == result.particles[:, 0].max()
    assert SamplerSettings.preset("paper").weighting == "level"


# --- constraints ----------------------------------------------------------------------------


def test_half_space_is_never_violated():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(HalfSpace([1.0, 0.0], 0.5))]
    result = run(factors, num_particles=500)
    alive = result.log_weights > -math.inf
    assert (result.particles[alive, 0] <= 0.5).all()
    assert result.best[0] <= 0.5


def test_every_particle_dying_names_the_level_and_constraint():
    far = HalfSpace([1.0, 0.0], -50.0)  # x₀ ≤ −50: unreachable
    factors = [Factor(gaussian([0.0, 0.0])), Factor(far, name="wall")]
    # by default violations are penalised before the last level and kill at the last one
    with pytest.raises(AllParticlesDiedError, match=r"level 8 \(sigma=.*'wall' \(64 of 64\)"):
        run(factors)
    with pytest.raises(AllParticlesDiedError, match=r"level 0 \(sigma=.*'wall' \(64 of 64\)"):
        run(factors, constraint_penalty=math.inf)


def test_intermediate_violations_do_not_kill_particles_that_end_inside():
    """Modes at ±2, constraint x₀ ≤ −1: early estimates x̂₀ ≈ 0 all violate it, yet the
    left mode satisfies it. Killing at every level dies at once; the default reaches it."""
    modes = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], [[0.1, 0.1], [0.1, 0.1]], [0.5, 0.5])
    factors = [Factor(modes), Factor(HalfSpace([1.0, 0.0], -1.0), name="left")]
    result = run(factors, num_particles=256)
    alive = result.log_weights > -math.inf
    assert alive.sum() > 20
    assert (result.particles[alive, 0] <= -1.0).all()
    with pytest.raises(AllParticlesDiedError, match="level 0"):
        run(factors, num_particles=256, constraint_penalty=math.inf, schedule="shifted")


class ShiftProposal:
    """A constraint that pins coordinate 1 to 0 by projection: a real propose/project expert."""

    def describe(self):
        return ExpertInfo("pin", ExpertKind.CONSTRAINT, frozenset({Capability.PROJECT}))

    def log_potential(self, x0):
        return torch.where(x0[:, 1].abs() < 1e-9, 0.0, -torch.inf).to(x0.dtype)

    def project(self, x, sigma):
        x = x.clone()
        x[:, 1] = 0.0
        return x


def test_constraint_projection_runs_before_the_mcmc_and_weights():
    factors = [Factor(gaussian([0.0, 0.0])), Factor(ShiftProposal())]
    result = run(factors, mcmc_steps=0)
    assert (result.particles[:, 1] == 0).all()


# --- bad settings and shapes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_particles=-1), "num_particles"),
        (dict(num_particles=0), "num_particles"),
        (dict(ess_threshold=1.5), "ess_threshold"),
        (dict(ess_threshold=-0.1), "ess_threshold"),
        (dict(mcmc_steps=-2), "mcmc_steps"),
        (dict(step_size=0.0), "step_size"),
        (dict(resampling="bogus"), "resampling"),
        (dict(mcmc="nuts"), "mcmc"),
        (dict(sigmas=(1.0, 0.5, 0.7)), "sigmas"),
        (dict(sigmas=(0.9, 0.5, 0.0)), "sigmas"),
        (dict(damping=1.0), "damping"),
        (dict(unknown_field=1), "unknown_field"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerSettings(**kwargs)


def test_bad_factors_name_the_field():
    g = gaussian([0.0, 0.0])
    with pytest.raises(ValueError, match="weight: must be finite"):
        Factor(g, weight=float("nan"))
    with pytest.raises(ValueError, match="sample_shape"):
        run([Factor(g)], shape=(3,))
    with pytest.raises(ValueError, match="sample_shape"):
        run([Factor(g)], shape=(0,))
    with pytest.raises(ValueError, match="region"):
        run([Factor(g, region=torch.ones(3))])
    with pytest.raises(ValueError, match="region"):
        run([Factor(g, region=torch.tensor([1.0, 2.0]))])
    with pytest.raises(ValueError, match="positive total generative weight"):
        run([Factor(g, region=torch.tensor([1.0, 0.0]))])
    with pytest.raises(ValueError, match="at least one generative"):
        run([Factor(LinearReward([1.0, 0.0]))])
    with pytest.raises(ValueError, match="duplicate factor names"):
        run([Factor(g), Factor(g)])
    with pytest.raises(ValueError, match=r"factors\[1\].region"):
        run([Factor(g), Factor(LinearReward([1.0, 0.0]), region=torch.ones(2))])
    with pytest.raises(TypeError, match=r"factors\[0\]"):
        run([g])
    with pytest.raises(ValueError, match="mcmc: 'mala' needs log_prob"):
        run([Factor(VelocityOnly())], mcmc="mala")
    with pytest.raises(ValueError, match="preset"):
        SamplerSettings.preset("fast")


def test_unknown_expert_name_names_the_field():
    with pytest.raises(ValueError, match="expert: unknown expert name 'nope'"):
        create_expert("nope")
    expert = create_expert("gaussian_mixture", means=[[0.0]], covariances=[[1.0]], weights=[1.0])
    assert expert.describe().kind == ExpertKind.GENERATIVE


class VelocityOnly:
    def describe(self):
        return ExpertInfo("velocity_only", ExpertKind.GENERATIVE)

    def velocity(self, x, sigma):
        return x


class BrokenReward:
    def describe(self):
        return ExpertInfo("broken", ExpertKind.DISCRIMINATIVE)

    def log_potential(self, x0):
        return torch.full((x0.shape[0],), float("nan"))


class WrongShape:
    def describe(self):
        return ExpertInfo("wrong_shape", ExpertKind.GENERATIVE)

    def velocity(self, x, sigma):
        return x[:, :1]


def test_broken_experts_are_named():
    g = gaussian([0.0, 0.0])
    with pytest.raises(ValueError, match=r"expert 'broken'.*NaN"):
        run([Factor(g), Factor(BrokenReward())])
    with pytest.raises(ValueError, match=r"expert 'wrong_shape': velocity\(\) returned shape"):
        run([Factor(WrongShape())])
    with pytest.raises(TypeError, match="describe"):
        run([Factor(object())])


class InSpace:
    def __init__(self, name, space):
        self.name, self.space = name, space

    def describe(self):
        return ExpertInfo(self.name, ExpertKind.GENERATIVE, latent_space=self.space)

    def velocity(self, x, sigma):
        return x


def test_generative_experts_must_share_a_latent_space():
    with pytest.raises(ValueError, match=r"one latent space, got \['flux-vae-16', 'sd3-vae-16'\]"):
        run([Factor(InSpace("a", "flux-vae-16")), Factor(InSpace("b", "sd3-vae-16"))])
    run([Factor(InSpace("a", "flux-vae-16")), Factor(InSpace("b", ""))], mcmc_steps=0)


class AnnouncesWithoutMethods:
    def describe(self):
        return ExpertInfo("liar", ExpertKind.GENERATIVE, frozenset({Capability.AUTOENCODER}))

    def velocity(self, x, sigma):
        return x


def test_announced_capabilities_need_their_methods():
    with pytest.raises(TypeError, match=r"announces 'autoencoder' but has no encode\(\)"):
        run([Factor(AnnouncesWithoutMethods())])


# --- transition="auto" ------------------------------------------------------------------------


def _transition(factors, shape=(2,), **settings) -> str:
    return run(factors, shape, **(dict(num_particles=64, num_steps=4) | settings)).transition


def test_auto_takes_fk_for_a_product_with_enough_particles_per_coordinate():
    """FK where its weights correct something (a product) and N ≥ 32 per coordinate."""
    pair = [Factor(gaussian([0.0, 0.0], name="a")), Factor(gaussian([2.0, 2.0], name="b"))]
    assert SamplerSettings().transition == "auto"
    assert _transition(pair) == "fk"  # 64 ≥ 32·2
    assert _transition(pair, num_particles=63) == "euler"
    triple = [Factor(gaussian([0.0] * 3, name="a")), Factor(gaussian([2.0] * 3, name="b"))]
    assert _transition(triple, shape=(3,), num_particles=95) == "euler"  # 95 < 32·3
    assert _transition(triple, shape=(3,), num_particles=96) == "fk"
    assert _transition([Factor(gaussian([0.0, 0.0]), weight=0.5)]) == "fk"  # one expert, β ≠ 1
    assert _transition([Factor(gaussian([0.0, 0.0]))]) == "euler"  # one expert, β = 1: A ≡ 0
    assert _transition(pair, transition="euler") == "euler"
    assert _transition(pair, num_particles=2, transition="fk") == "fk"


def test_auto_is_euler_when_a_scored_constraint_has_no_log_density():
    """FK weighs a scored constraint by its log_prob: without one, "auto" keeps Euler (and an
    explicit "fk" is refused, naming the field)."""
    from poegen.kernel import Capability
    from poegen.kernel.experts import ExpertKind, KernelError

    class ScoreOnlyTie(GaussianMixture):
        def describe(self):
            info = super().describe()
            return dataclasses.replace(
                info, kind=ExpertKind.CONSTRAINT, capabilities=frozenset({Capability.SCORE})
            )

        def log_potential(self, x0):
            return torch.zeros(x0.shape[0], dtype=torch.float64)

    tie = ScoreOnlyTie(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2), [1.0], name="t")
    pair = [Factor(gaussian([0.0, 0.0], name="a")), Factor(gaussian([2.0, 2.0], name="b"))]
    assert _transition([*pair, Factor(tie)], mcmc_steps=1) == "euler"
    with pytest.raises(KernelError, match="transition"):
        _transition([*pair, Factor(tie)], mcmc_steps=1, transition="fk")
