"""The exact-target accuracy suite: metrics, tasks, baselines and the demo.

Thresholds come from measured noise floors (an exact sample of the same size against the same
reference) and from measured spreads over seeds, with margin; every run has a fixed seed.
"""

import dataclasses
import itertools
import math

import pytest
import torch

from poegen.bench import accuracy, baselines, metrics, tasks
from poegen.expert_servers.analytic import ring_of_gaussians
from poegen.kernel import Factor, SamplerSettings, sample
from poegen.kernel.schedule import sigmas_for

F64 = torch.float64


def small(task: tasks.Task, **update) -> tasks.Task:
    return dataclasses.replace(task, settings=task.settings.model_copy(update=update))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- metrics ---------------------------------------------------------------------------------


def test_energy_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = torch.randn(300, 3, generator=gen(0), dtype=F64)
    assert abs(metrics.energy_distance(x, x)) < 1e-12
    shifted = [metrics.energy_distance(x, x + s) for s in (0.1, 0.5, 2.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    # for a pure shift the population value is known for large shifts: 2|s| − ... > 0
    assert shifted[2] > 1.0


def test_weighted_energy_distance_equals_the_duplicated_set():
    """Integer weights k_i/n are exactly the set with x_i repeated k_i times (V-statistic)."""
    x = torch.randn(50, 2, generator=gen(1), dtype=F64)
    counts = torch.randint(1, 5, (50,), generator=gen(2))
    log_w = torch.log(counts.to(F64) / counts.sum())
    ref = metrics.Reference(torch.randn(400, 2, generator=gen(3), dtype=F64))
    weighted = ref.energy_distance(x, log_w)
    duplicated = ref.energy_distance(x.repeat_interleave(counts, dim=0))
    assert weighted == pytest.approx(duplicated, rel=1e-10, abs=1e-12)


def test_weighted_set_matches_its_resampled_draws():
    """A weighted set and many equal-weight draws from it are the same law."""
    x = torch.randn(400, 2, generator=gen(4), dtype=F64)
    log_w = (0.8 * x[:, 0]).log_softmax(0)
    ref = metrics.Reference(
        torch.randn(1000, 2, generator=gen(5), dtype=F64) + torch.tensor([0.8, 0])
    )
    draws = x[torch.multinomial(log_w.exp(), 6000, replacement=True, generator=gen(6))]
    weighted, resampled = ref.energy_distance(x, log_w), ref.energy_distance(draws)
    assert abs(weighted - resampled) < 0.02 * ref.self_term


def test_u_statistic_is_centred_and_v_statistic_sits_at_the_floor():
    mix = ring_of_gaussians(8, 0.5, 0.08)
    ref = metrics.Reference(mix.sample(1500, gen(7)), sampler=mix.sample)
    n, values_u, values_v = 200, [], []
    for seed in range(30):
        y = mix.sample(n, gen(100 + seed))
        values_v.append(ref.energy_distance(y))
        values_u.append(metrics.energy_distance(y, ref.samples, statistic="u"))
    mean_v = sum(values_v) / len(values_v)
    assert min(values_v) > -1e-3 * ref.self_term / n
    assert mean_v == pytest.approx(ref.self_term / n, rel=0.5)  # E[V] = E|Y − Y'|/n
    assert abs(sum(values_u) / len(values_u)) < 0.3 * ref.self_term / n


def test_mode_weights_violation_rate_and_moment_errors():
    labels = torch.tensor([0, 0, 1, 2])
    log_w = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    torch.testing.assert_close(
        metrics.mode_weights(labels, log_w, 4), torch.tensor([0.3, 0.3, 0.4, 0.0], dtype=F64)
    )
    inside = torch.tensor([0.0, -math.inf, 0.0, -math.inf], dtype=F64)
    assert metrics.violation_rate(inside, log_w) == pytest.approx(0.6)
    x = torch.randn(20000, 3, generator=gen(8), dtype=F64)
    assert metrics.mean_error(x, None, torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)) < 0.03
    assert metrics.cov_error(x, None, torch.eye(3, dtype=F64)) < 0.05
    assert metrics.kish_ess(log_w, 4) == pytest.approx(1 / 0.3)


# --- the kernel against exact targets --------------------------------------------------------


def test_one_mixture_expert_reproduces_itself():
    """Acceptance check 1: exact velocities, no MCMC, no potentials: the expert's own law."""
    mix = ring_of_gaussians(8, 0.5, 0.08)
    ref = metrics.Reference(mix.sample(4096, gen(0)), sampler=mix.sample)
    floor = ref.self_term / 512  # E[ED] of 512 exact draws (measured 3.8e-4 .. 2.2e-3 over seeds)
    for mcmc_steps in (0, 5):
        settings = SamplerSettings(
            num_particles=512, num_steps=50, schedule="linear", mcmc_steps=mcmc_steps,
            step_size=1.0,
        )  # fmt: skip
        result = sample([Factor(mix)], (2,), settings, generator=gen(1), dtype=F64)
        assert ref.energy_distance(result.particles, result.log_weights) < 3 * floor, mcmc_steps


def test_t1_poegen_beats_summation_at_equal_budget():
    """Acceptance check 5. Measured ratio 0.02–0.18 over seeds 0–7 at N = 256
    (``bench/results/kernel_figures.json``, ``t1_ratio``)."""
    task = small(tasks.t1(), num_particles=256, num_steps=50)
    ref = accuracy.reference(task, 2048)
    total = baselines.budget(task)
    poe = baselines.run_poegen(task, seed=0)
    summed = baselines.run_summation(task, seed=0, total=total)
    assert summed.total_evaluations <= total
    assert summed.total_evaluations > 0.99 * total
    ratio = ref.energy_distance(poe.particles, poe.log_weights) / ref.energy_distance(
        summed.particles
    )
    assert ratio < 0.5
    assert ref.mode_tv(poe.particles, poe.log_weights) < 0.5 * ref.mode_tv(summed.particles)


def test_t5_never_violates_the_constraint():
    """Acceptance check 4: zero weight outside the half-space, and the best particle inside."""
    task = small(tasks.t5(), num_particles=256, num_steps=30)
    run = baselines.run_poegen(task, seed=0)
    inside = task.constraints[0].expert.log_potential(run.particles)
    assert metrics.violation_rate(inside, run.log_weights) == 0.0
    assert torch.isneginf(run.log_weights[torch.isneginf(inside)]).all()
    assert task.constraints[0].expert.log_potential(run.best[None]).item() == 0.0
    summed = baselines.run_summation(task, seed=0, total=baselines.budget(task))
    assert (
        metrics.violation_rate(task.constraints[0].expert.log_potential(summed.particles), None)
        > 0.2
    )


def _t3_evidence_ratios(settings: SamplerSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Ẑ/Z on T3 over seeds 0–15, and its standard error."""
    task = tasks.t3()
    ratios = []
    for seed in range(16):
        result = sample(task.factors, (2,), settings, generator=gen(seed), dtype=F64)
        ratios.append(math.exp(result.log_evidence - task.exact_log_evidence))
    ratios = torch.tensor(ratios, dtype=F64)
    return ratios, ratios.std() / math.sqrt(len(ratios))


def test_t3_evidence_is_unbiased():
    """Acceptance check 2: mean of Ẑ/Z over independent runs (ESS threshold 1) is 1 within 3 SE.

    Ẑ is unbiased for E_q[exp r] with q the law of the chain's output; q differs from the prior
    by the Euler error (Z_q/Z = 0.954, 0.977, 0.988 at 25, 50, 100 levels without MCMC:
    first order in 1/L, not a kernel bug; ``kernel_figures.json``, ``t3_chain_law``). With
    resample-move (the default) the weights assume the moves keep π_σ·exp(φ) invariant: MALA
    does exactly (0.989 ± 0.006 over 16 runs), ULA at c = 1 only to O(η) (1.038 ± 0.003;
    ``t3_evidence.mala`` / ``.ula``), so the evidence check uses MALA, which the analytic
    experts allow; the default's bias is pinned by the next test.
    """
    settings = SamplerSettings(
        num_particles=1024, num_steps=40, schedule="linear", mcmc_steps=3, step_size=1.0,
        ess_threshold=1.0, mcmc="mala",
    )  # fmt: skip
    ratios, se = _t3_evidence_ratios(settings)
    assert abs(ratios.mean() - 1) < 3 * se + 0.005  # 0.005: the measured Euler bias bound
    assert se < 0.03


def test_t3_evidence_of_the_default_kernel_carries_its_measured_ula_bias():
    """The default kernel (ULA at c = 1, resample-move; Euler, which "auto" takes for T3's one
    expert) on T3, at the MALA test's settings: its weights assume moves that keep π_σ·exp(φ) invariant, which ULA does
    only to O(η), so Ẑ/Z is biased upward. Measured over seeds 0–15: 1.0377 ± 0.0032 (seeds
    0–31: 1.0352 ± 0.0026), the documented 1.038. Pinned within 3 of this run's own standard
    errors, and distinct from 1 (a kernel that lost or grew the bias fails).
    """
    settings = SamplerSettings(
        num_particles=1024, num_steps=40, schedule="linear", mcmc_steps=3, step_size=1.0,
        ess_threshold=1.0,
    )  # fmt: skip
    assert (settings.mcmc, settings.transition) == ("ula", "auto")  # the defaults
    one_expert = sample(tasks.t3().factors, (2,), settings.model_copy(update={"num_steps": 2}),
                        generator=gen(0), dtype=F64)  # fmt: skip
    assert one_expert.transition == "euler"  # "auto" on one expert at β = 1
    ratios, se = _t3_evidence_ratios(settings)
    assert abs(ratios.mean() - 1.038) < 3 * se
    assert ratios.mean() - 1 > 3 * se + 0.005  # beyond MC error and the Euler bias bound
    assert se < 0.006


@pytest.mark.slow
def test_t3_evidence_is_unbiased_for_the_chains_own_law():
    """Without MCMC at 25 levels Z_q/Z ≈ 0.954 (``bench/results/kernel_figures.json``,
    ``t3_chain_law.levels_25``): Ẑ tracks Z_q (the chain's law), not Z."""
    task = tasks.t3()
    settings = SamplerSettings(
        num_particles=1024, num_steps=25, schedule="linear", mcmc_steps=0, ess_threshold=1.0
    )
    ratios = [
        math.exp(
            sample(task.factors, (2,), settings, generator=gen(s), dtype=F64).log_evidence
            - task.exact_log_evidence
        )
        for s in range(60)
    ]
    chain = sample(
        task.generative, (2,), settings.model_copy(update={"num_particles": 200_000}),
        generator=gen(999), dtype=F64,
    ).particles  # fmt: skip
    reward = task.rewards[0].expert.log_potential(chain).to(F64)
    z_q = torch.exp(reward - task.exact_log_evidence).mean()
    ratios = torch.tensor(ratios, dtype=F64)
    se = ratios.std() / math.sqrt(len(ratios))
    assert z_q < 0.97  # the Euler bias is real and measurable
    assert abs(ratios.mean() - z_q) < 3 * se + 0.004


@pytest.mark.parametrize(("name", "tolerance"), [("T4_grid", 0.05), ("T4_ring", 0.15)])
def test_t4_expected_reward_matches_das(name, tolerance):
    """DAS's targets: E[r] = −0.2907 (grid), −1.3400 (ring), with FK-style settings (no MCMC:
    the flow of one exact expert needs none; see the xfail below for poegen's MCMC).

    Measured |error| over seeds 0–5 at N = 2048, 50 levels: ≤ 0.027 (grid), ≤ 0.081 (ring; its
    E[r] differs by 1.6 between the two modes, so mode-weight noise dominates;
    ``bench/results/kernel_figures.json``, ``t4_das``).
    """
    task = tasks.build(name)
    assert task.exact_reward == pytest.approx(task.expected["reward"], abs=1e-4)
    run = baselines.run_poegen(
        task,
        seed=0,
        settings=baselines.fk_settings(task, 2048).model_copy(update={"num_steps": 50}),
    )
    reward = task.rewards[0].expert.log_potential(run.particles).to(F64)
    assert metrics.weighted_mean(reward, run.log_weights) == pytest.approx(
        task.exact_reward, abs=tolerance
    )


def test_t4_ring_with_mala_reaches_the_noise_floor_and_default_ula_stays_within_ten():
    """Strong reward with MCMC: the moves must keep π_σ·exp(φ_k) invariant (resample-move).

    ED / noise floor (floor: E[ED] of 512 exact draws), N = 512, 50 levels, re-measured:
    MALA (exact moves) seeds 0–4: 1.64, 0.20, 0.41, 0.36, 2.35 — at the floor (< 3×, the bound
    ``test_one_mixture_expert_reproduces_itself`` uses). The default ULA (c = 1, O(η) bias)
    seeds 0–4: 6.32, 4.84, 0.97, 3.94, 0.78 (seeds 5–9: 3.64, 8.12, 2.27, 1.62, 0.97) — not
    at the floor but within 10× of it, and above it on average (3.4 vs MALA's 1.0). Moves that
    ignore the reward (``mcmc_rewards=False``) reach 79 and 653 at seeds 3 and 4: the weights
    degenerate (``bench/results/kernel_figures.json``, ``t4_ring_floor``).
    """
    task = small(tasks.t4_ring(), num_particles=512, num_steps=50)
    ref = accuracy.reference(task, 2048)
    floor = ref.self_term / 512
    ratios = {}
    for kernel in ("mala", "ula"):
        settings = task.settings.model_copy(update={"mcmc": kernel})
        ratios[kernel] = [
            ref.energy_distance(run.particles, run.log_weights) / floor
            for run in (
                sample(task.factors, (2,), settings, generator=gen(seed), dtype=F64)
                for seed in range(5)
            )
        ]
    assert task.settings.mcmc == "ula"  # the default kernel
    assert max(ratios["mala"]) < 3, ratios
    assert max(ratios["ula"]) < 10, ratios
    assert sum(ratios["ula"]) > 2 * sum(ratios["mala"]), ratios  # ULA's bias shows


def test_no_mcmc_no_potentials_is_bitwise_euler_on_the_averaged_velocity():
    """The summation baseline is exactly a hand-written Euler loop (float64, bitwise)."""
    task = small(tasks.t1(), num_particles=64, num_steps=20, mcmc_steps=0, transition="euler")
    settings = task.settings
    result = sample(task.generative, (2,), settings, generator=gen(3), dtype=F64)
    x = torch.randn(64, 2, generator=gen(3), dtype=F64)
    experts = [f.expert for f in task.generative]
    sigmas = sigmas_for(settings).tolist()  # ends at 0: the last step is x̂_0 = x − σ·v̄
    for s, s_next in itertools.pairwise(sigmas):
        sig = torch.full((64,), s, dtype=F64)
        v = sum(e.velocity(x, sig) for e in experts) / len(experts)
        x = x + (s_next - s) * v
    assert torch.equal(result.particles, x)


def test_budgets_match_and_the_trace_counts_them():
    task = small(tasks.t3(), num_particles=64, num_steps=10)
    total = baselines.budget(task)
    runs = [baselines.run(m, task, 0, total) for m in baselines.METHODS]
    for run in runs:
        assert 0.9 * total < run.total_evaluations <= total, run.method
    fk = runs[baselines.METHODS.index("fk")]
    assert fk.num_particles > task.settings.num_particles  # no MCMC buys more particles


# --- the suite and the demo ------------------------------------------------------------------


def test_suite_table_and_json(tmp_path):
    out = tmp_path / "acc.json"
    assert accuracy.main(["--quick", "--tasks", "T1,T5", "--out", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"T1", "T5"}
    t5 = data["tasks"]["T5"]["methods"]
    assert t5["poegen"]["summary"]["violation_rate"]["mean"] == 0.0
    assert "summation" in data["tasks"]["T1"]["ratios"]


def test_demo_writes_a_non_trivial_png(tmp_path, capsys):
    from poegen.clients import demo

    out = tmp_path / "demo.png"
    args = ["--out", str(out), "--particles", "64", "--steps", "20", "--seeds", "1"]
    assert demo.main([*args, "--reference", "256"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # not blank
    assert "poegen / summation energy distance" in capsys.readouterr().out


@pytest.mark.parametrize(
    "update",
    [dict(mcmc="ula"), dict(mcmc="mala"), dict(mcmc="hmc", leapfrog_steps=3),
     dict(mcmc="uhmc", leapfrog_steps=2), dict(mcmc="mala", transition="fk"),
     dict(mcmc="hmc", mcmc_rewards=False), dict(mcmc="ula", transition="fk", mcmc_steps=0)],
    ids=lambda u: "-".join(f"{v}" for v in u.values()),
)  # fmt: skip
def test_the_budget_formula_counts_every_kernels_calls(update):
    """cost_per_particle (what equal-evaluation baselines are given) equals the evaluations the
    kernel's trace counts, for every MCMC kernel (MH kernels also read log-densities, HMC's
    leapfrog steps are evaluations), both transitions, with a reward and a scored tie."""
    from poegen.expert_servers.masked import MaskedTarget

    task = tasks.t3()
    tie = MaskedTarget([0.5, 0.0], [1.0, 0.0], 2.0, name="tie", propose=False, score=True)
    task = dataclasses.replace(task, factors=(*task.factors, Factor(tie)))
    settings = task.settings.model_copy(update={"num_particles": 8, "num_steps": 6, **update})
    run = baselines.run_poegen(task, 0, settings)  # raises when the counts disagree
    generative, potentials, ties = baselines.factor_counts(task)
    assert (generative, potentials, ties) == (1, 1, 1)
    assert sum(run.evaluations.values()) == 8 * baselines.cost_per_particle(settings, 1, 1, 1)
