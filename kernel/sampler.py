"""The annealed MCMC + SMC sampler over a product of experts.

Target (see ``poegen.kernel.experts`` for the three kinds of factor)::

    p(x) ∝ Π_i p_i(x)^{w_i} · Π_j exp(λ_j·r_j(x)) · Π_k 1[x ∈ C_k]

Pseudo-code of :func:`sample_iter` (N particles, noise levels 1 = σ_0 > σ_1 > … > σ_L > 0;
π_k ∝ Π_i p_{i,σ_k}^{w_i} is the product of the noised generative experts)::

    x ~ π_0 = N(0, I/B)    (FK; N(0, I) under Euler),  log w ← 0
    for k = 1 … L:
        transition: x ← x + Δτ·(−V + δb(x) + (g²/2)·S) + g√Δτ·ξ,
                    log w += ½(A_δ,k−1 + A_δ,k)·Δτ,   δb = M x + c fitted to even A_δ   (FK)
                    x ← x + (σ_k − σ_{k−1})·v̄(x, σ_{k−1})                             (Euler)
        propose:    x ← propose/project(x, σ_k)           # constraint experts that move particles
        reweight:   φ_k ← s_k·Σ_j λ_j·r_j(x̂_0(x)) + Σ_c log C_c(x̂_0(x))   # s_k: tempering
                    log w += φ_k − φ_{k−1};  log Z += log Σ_i W_i·exp(increment_i)
        resample:   if ESS/N < threshold: (x, φ_k, evaluations) follow their ancestors, log w ← 0
        move:       x ← MCMC^M(x; π_k·exp(φ_k))            # summed scores + a potential stage
    return x̂_0 at σ_L, normalised log w, log Z, the best particle, the trace

(``poegen.kernel.transition`` derives the FK step, its rate A, the control drift δb and V, S,
g; ``transition="auto"`` picks FK or Euler per run, ``poegen.kernel.spec``.) This is an SMC
sampler (Del Moral, Doucet & Jasra 2006): the corrected transition carries π_{k−1} to π_k, so
exp(φ_k − φ_{k−1}) is the incremental weight from π_{k−1}·exp(φ_{k−1}) to π_k·exp(φ_k),
taken *before* the moves; the moves then keep π_k·exp(φ_k) invariant and rejuvenate
resampled copies. Under Euler the transition only approximately carries π_{k−1} to π_k and
the moves correct what they can: not the masses of separated modes.
The moves see the potential through a second accept test on exp(φ_k(x̂_0') − φ_k(x̂_0))
(delayed acceptance): discriminative experts never need gradients, at the price of one extra
call per move. s_L = 1, so the last level targets the product exactly.

With ``mcmc_rewards=False`` (and in the ``paper`` preset) the moves see the generative product
only and come *before* the weights; the weights φ_k − φ_{k−1} then telescope along each
particle's path to exp(φ_L), exact for any chain, but the moves undo the reward's selection
and under strong rewards the weights degenerate (T4 of the accuracy suite).

Hard constraints are potentials too. At the last level a violated constraint gives −inf (the
particle dies, and moves into violation are rejected); at level k of L it gives
−(k/L)·``constraint_penalty``. Killing at every level would be biased: early estimates x̂_0
are blurry averages (at σ = 1, the mean of the prior), which can lie outside a constraint that
the final samples satisfy. ``constraint_penalty=inf`` restores the kill-at-every-level rule.

Scored constraints. A constraint expert that announces ``SCORE`` (e.g. a Gaussian tie of a
masked region to a rendering, noised to each level exactly) is a soft factor *of the
intermediate targets* instead of a potential: w_c·score_c(x_σ, σ) joins the summed score of
every MCMC move (and w_c·log q_c,σ the MALA/HMC log-density, so it must announce ``LOG_PROB``
for those), like a generative factor without a velocity. Its ``log_potential`` is then not
used (the weights would count it twice); its proposals and projections still run. Under the
FK transition its noised log-density also enters the weights (``poegen.kernel.transition``),
so it must announce ``LOG_PROB`` there too. Stiff ties
(large w) want a smaller ``step_size`` or MALA: η = c·σ²/W_max does not include them.

Pixel-input potentials (``ExpertInfo.pixel_input``, e.g. a VLM reward) score decoded pixels:
every evaluation of the potentials (reweighting, each move's potential stage) decodes x̂_0
*once*, through the ``decode`` of the first generative expert with an autoencoder, and shares
pixels = clamp((D(x̂_0) + 1)/2, 0, 1) among all of them; experts without an autoencoder work
in pixel space, D = identity (see :func:`_pixel_source` for what is refused). Decoding is
counted as that generative expert's calls in the trace.

Combination rules for generative experts, with masks m_i (1 without a region) and
W(c) = Σ_i w_i·m_i(c) per coordinate c (must be > 0 everywhere):

* score: ∇log π_σ = Σ_i w_i·m_i ⊙ ∇log p_{i,σ} — product semantics, so overlapping regions add;
* FK transition: the summed velocity V = Σ_i w_i·m_i ⊙ v_i and the rate A per coordinate;
* Euler transition and x̂_0: v̄ = V / W, the per-coordinate weighted average (MultiDiffusion's
  rule); with Σ_i w_i = 1 and no regions it is exactly the summed-score flow.

With ``transition="euler"``, ``mcmc_steps=0`` and no discriminative or constraint factor, the
sampler is plain summed-score (Composable-Diffusion-style) Euler sampling.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.kernel import mcmc, particles, transition
from poegen.kernel.calls import ExpertCalls, ExpertStats
from poegen.kernel.experts import Capability, KernelError
from poegen.kernel.path import euler_step, x0_from_velocity
from poegen.kernel.potentials import (
    Potential,
    check_alive,
    evaluate_potentials,
    level_potential,
    violation_cost,
)
from poegen.kernel.problem import (
    Problem,
    build_problem,
    check_shape,
    noise_grid,
    resolve_transition,
)
from poegen.kernel.schedule import adaptive_scale, reward_scales
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.kernel.target import target_factory

TARGET_ACCEPTANCE = {"mala": 0.574, "hmc": 0.65}  # what step-size adaptation aims for


@dataclass(frozen=True, slots=True)
class LevelTrace:
    """What happened at one noise level (also the progress event of that level).

    Attributes:
        step: level index, 0 at the first transition.
        sigma: noise level σ_k.
        ess: ESS/N after reweighting, before any resampling.
        resampled: whether the particles were resampled.
        acceptance: mean MH acceptance rate over particles and steps; NaN when unadjusted.
        log_weight_spread: max − min of the finite log-weights after reweighting.
        reward_scale: the tempering scale s_k ∈ [0, 1].
        log_evidence: running log Z estimate.
        experts: calls and seconds per expert during this level.
        seconds: wall-clock seconds of the level.
        best_index: the particle with the highest current potential.
        preview: that particle's clean estimate x̂_0, shape S.
        checkpoint: the particle system after this level (resume a run from it).
        levels: the number of levels of the run.
    """

    step: int
    sigma: float
    ess: float
    resampled: bool
    acceptance: float
    log_weight_spread: float
    reward_scale: float
    log_evidence: float
    experts: Mapping[str, ExpertStats]
    seconds: float
    best_index: int
    preview: Tensor
    checkpoint: Checkpoint | None = None
    levels: int = 0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The particle system after ``levels_done`` levels: all a run needs to go on as if it had
    never stopped. ``sample_iter(..., resume=checkpoint)`` with the same factors, shape and
    settings continues with level ``levels_done`` and returns the uninterrupted run's result
    bit for bit (given experts that answer the same inputs the same way).

    Attributes:
        levels_done: levels finished; the index of the next level.
        x: particles x_σ, shape ``(N, *S)``.
        here: π_σ evaluated at ``x`` (reused by the next transition and the final x̂_0).
        log_w: log-weights, ``(N,)`` float64.
        potential: φ at each particle, ``(N,)`` float64.
        log_z: running log-evidence estimate.
        scale: the reward tempering scale of the last reweighting.
        step_scale: the MCMC step-size scale of the next moves.
        generator_state: the run's generator after the level (``Generator.get_state()``).
    """

    levels_done: int
    x: Tensor
    here: mcmc.TargetEval
    log_w: Tensor
    potential: Tensor
    log_z: float
    scale: float
    step_scale: float
    generator_state: Tensor


@dataclass(frozen=True, slots=True)
class ExpertRecord:
    """Which model served a factor."""

    name: str
    kind: str
    model_id: str
    revision: str


@dataclass(frozen=True, slots=True)
class SampleResult:
    """The weighted particle set and its history.

    Attributes:
        particles: clean samples x̂_0, shape ``(N, *S)``.
        log_weights: normalised log-weights (logsumexp = 0), shape ``(N,)``.
        log_evidence: under Euler, an estimate of log E_q[Π_j exp(λ_j r_j)·Π_k 1[C_k]], q the
            generative product as the chain reaches it (exact up to the Euler transport and,
            for ULA, the O(η) bias of the moves; 0 without discriminative and constraint
            factors); under FK, of log ∫ Π_i p_i^{w_i}·Π_j exp(λ_j r_j)·Π_k 1[C_k] (the whole
            product's normaliser).
        best_index: the living particle with the highest total log-potential (the paper's
            output; not a sample from p).
        trace: one entry per level.
        experts: the experts that served the run.
        transition: the transition that ran, "fk" or "euler" (``"auto"`` resolved).
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: float
    best_index: int
    trace: tuple[LevelTrace, ...]
    experts: tuple[ExpertRecord, ...]
    transition: str = "euler"

    @property
    def best(self) -> Tensor:
        return self.particles[self.best_index]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def draws(self, n: int, *, generator: torch.Generator) -> Tensor:
        """n equally weighted draws from the weighted set (systematic resampling)."""
        return self.particles[particles.systematic(self.log_weights, n, generator=generator)]


def sample(
    factors: Sequence[Factor],
    sample_shape: Sequence[int],
    settings: SamplerSettings | None = None,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    callback: Callable[[LevelTrace], None] | None = None,
    resume: Checkpoint | None = None,
) -> SampleResult:
    """Sample from the product of ``factors``; see :func:`sample_iter`."""
    run = sample_iter(
        factors, sample_shape, settings, generator=generator, dtype=dtype, device=device,
        resume=resume,
    )  # fmt: skip
    while True:
        try:
            event = next(run)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(event)


def sample_iter(
    factors: Sequence[Factor],
    sample_shape: Sequence[int],
    settings: SamplerSettings | None = None,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    resume: Checkpoint | None = None,
) -> Generator[LevelTrace, None, SampleResult]:
    """Yield one :class:`LevelTrace` per level; return the :class:`SampleResult`.

    All randomness comes from ``generator`` (drawn on the CPU, moved to ``device``), so the
    same seed gives the same result. Closing the generator early stops the run.

    ``resume``: a level's :class:`Checkpoint` (``LevelTrace.checkpoint``) of a run of the same
    factors, shape and settings; the run goes on from there (``generator`` takes the saved
    state) and the result's ``trace`` holds the levels run since.
    """
    settings = settings or SamplerSettings()
    shape = check_shape(sample_shape)
    problem = build_problem(factors, shape, settings, dtype, device)
    settings = resolve_transition(settings, problem, shape)  # "auto" → "fk" or "euler"
    levels = _levels([float(s) for s in noise_grid(settings, problem, shape) if s > 0])
    scales = reward_scales(settings, len(levels)).tolist()
    experts = [*problem.generative, *problem.ties, *problem.potentials]
    with ExpertCalls(experts, settings.max_batch) as calls:
        run = _Run(settings, problem, calls, target_factory(problem, calls, settings), scales)
        if resume is None:
            state = run.initial(settings.num_particles, shape, generator, dtype, device)
        else:
            state = run.restore(resume, len(levels), shape, generator, dtype, device)
        first = 0 if resume is None else resume.levels_done
        trace = []
        for k, (sigma_prev, sigma) in enumerate(levels[first:], start=first):
            started = time.perf_counter()
            state = run.transition(state, sigma_prev, sigma, generator)  # and proposals
            if not run.moves_see_potentials:  # path bookkeeping: move first, weigh after
                state = run.move(state, k, sigma, generator, with_potential=False)
            state, weighed = run.reweight(state, k, sigma)
            state = run.resample(state, generator)
            if run.moves_see_potentials:  # resample-move: the moves keep π_σ·exp(φ_k) invariant
                state = run.move(state, k, sigma, generator, with_potential=True)
            seconds = time.perf_counter() - started
            trace.append(run.summary(k, sigma, weighed, state, seconds, generator, len(levels)))
            yield trace[-1]
    log_w = particles.normalize(state.log_w)
    x0 = x0_from_velocity(state.x, levels[-1][1], state.here.velocity)
    best = _best(state.potential, log_w)
    return SampleResult(
        x0, log_w, state.log_z, best, tuple(trace), _records(problem), settings.transition
    )


def _levels(sigmas: list[float]) -> list[tuple[float | None, float]]:
    """(σ_{k−1}, σ_k) per level; a one-step grid (1 → 0) is one level at σ = 1 with no
    transition: x̂_0 = x − v(x, 1) is its Euler step to 0 (distilled one-step models)."""
    if not sigmas:
        raise KernelError("num_steps", "the noise grid needs a level strictly between 0 and 1")
    if len(sigmas) == 1:
        return [(None, sigmas[0])]
    return list(itertools.pairwise(sigmas))


@dataclass(frozen=True, slots=True)
class _State:
    """The particle system between the named steps of one level.

    Attributes:
        x: particles x_σ, shape ``(N, *S)``.
        here: π_σ evaluated at ``x`` (velocity, score, log-density, FK rate).
        log_w: log-weights, ``(N,)`` float64.
        potential: φ_k at each particle, ``(N,)`` float64 (φ_{k−1} until reweighted).
        log_z: running log-normaliser estimate.
        scale: the reward tempering scale s_k of the last reweighting.
        fk_increment: the FK transition's log-weight increment of this level, ``(N,)``.
        resampled: whether this level resampled.
        acceptance: mean MH acceptance of this level's moves (NaN: none tested).
        step_scale: the MCMC step-size scale c of the next moves (adapted for MH kernels).
    """

    x: Tensor
    here: mcmc.TargetEval
    log_w: Tensor
    potential: Tensor
    log_z: float
    scale: float = 0.0
    fk_increment: Tensor | None = None
    resampled: bool = False
    acceptance: float = math.nan
    step_scale: float = 1.0

    def take(self, idx: Tensor) -> _State:
        """The particles ``idx``, equally weighted (after resampling)."""
        n = idx.numel()
        return dataclasses.replace(
            self,
            x=self.x[idx],
            here=self.here.take(idx),
            log_w=torch.zeros(n, dtype=torch.float64),
            potential=self.potential[idx],
            resampled=True,
        )

    def checkpoint(self, levels_done: int, generator: torch.Generator) -> Checkpoint:
        return Checkpoint(levels_done, self.x, self.here, self.log_w, self.potential, self.log_z,
                          self.scale, self.step_scale, generator.get_state())  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Weighed:
    """Diagnostics of one reweighting (before any resampling)."""

    ess: float
    spread: float
    best: int
    preview: Tensor


@dataclass(frozen=True, slots=True)
class _Run:
    """The named steps of one run (transition with proposals, move, reweight, resample,
    summary); each takes a :class:`_State` and returns a new one."""

    settings: SamplerSettings
    problem: Problem
    calls: ExpertCalls
    target_at: Callable[[float], mcmc.Target]
    scales: list[float]

    @property
    def fk(self) -> bool:
        return self.settings.transition == "fk"

    @property
    def moves_see_potentials(self) -> bool:
        s = self.settings
        return s.mcmc_rewards and bool(self.problem.potentials) and s.mcmc_steps > 0

    def initial(self, n, shape, generator, dtype, device) -> _State:
        """x ~ π_1 exactly: N(0, 1/B) per coordinate under FK, N(0, I) under Euler."""
        if self.fk:
            x = transition.initial_noise((n, *shape), self.problem.total_weight,
                                         generator=generator, dtype=dtype)  # fmt: skip
            log_z = transition.initial_log_normalizer(self.problem.total_weight)
        else:
            x, log_z = torch.randn((n, *shape), generator=generator, dtype=dtype), 0.0
        x = x.to(device)
        here = self.target_at(1.0)(x)
        log_w = torch.zeros(n, dtype=torch.float64)
        if here.tie_log_prob is not None:  # π_1 of the whole product: Π_c q_c,1^{w_c} too
            log_z += float(particles.log_mean_weight(log_w, here.tie_log_prob))
            log_w = particles.sanitize(here.tie_log_prob)
        return _State(x, here, log_w, torch.zeros(n, dtype=torch.float64), log_z,
                      step_scale=self.settings.step_size)  # fmt: skip

    def restore(self, saved: Checkpoint, levels: int, shape: tuple[int, ...],
                generator: torch.Generator, dtype: torch.dtype, device) -> _State:  # fmt: skip
        """The state a :class:`Checkpoint` saved; the generator takes its saved state."""
        n = self.settings.num_particles
        if not 0 < saved.levels_done <= levels:
            raise KernelError("resume", f"levels_done {saved.levels_done} outside 1..{levels}")
        if tuple(saved.x.shape) != (n, *shape) or saved.x.dtype != dtype:
            raise KernelError(
                "resume", f"particles {tuple(saved.x.shape)} {saved.x.dtype}, expected "
                f"{(n, *shape)} {dtype}: a checkpoint of another run",
            )  # fmt: skip
        if saved.log_w.shape != (n,) or saved.potential.shape != (n,):
            raise KernelError("resume", f"log-weights and potentials need shape ({n},)")
        generator.set_state(saved.generator_state)
        return _State(saved.x.to(device), saved.here, saved.log_w, saved.potential,
                      saved.log_z, scale=saved.scale, step_scale=saved.step_scale)  # fmt: skip

    def transition(self, state: _State, sigma_prev: float | None, sigma: float,
                   generator: torch.Generator) -> _State:  # fmt: skip
        """σ_{k−1} → σ_k: the FK step (1) with its trapezoid weight, or Euler on v̄; then the
        constraint experts' proposals and projections at σ_k, and one evaluation of π_σ_k
        where the particles land (proposals are not weighed)."""
        reset = dict(fk_increment=None, resampled=False, acceptance=math.nan)
        here = state.here
        if sigma_prev is None:  # a one-step grid: no transport, only the proposals
            if not self.problem.proposers:
                return dataclasses.replace(state, **reset)
            x = _propose(self.problem, state.x, sigma, generator)
            return dataclasses.replace(state, x=x, here=self.target_at(sigma)(x), **reset)
        if self.fk:
            total = self.problem.total_weight
            summed = here.velocity * total
            score = transition.summed_score(state.x, sigma_prev, summed, total)
            control = None
            if self.settings.fk_control:  # δb of (3), fitted at the particles it moves
                control = transition.fit_control_drift(state.x, score, here.log_rate)
            x = transition.fk_step(state.x, sigma_prev, sigma, summed, total,
                                   self.settings.sde_noise, generator=generator,
                                   control=control)  # fmt: skip
        else:
            x = euler_step(state.x, sigma_prev, sigma, here.velocity)
        x = _propose(self.problem, x, sigma, generator)
        there = self.target_at(sigma)(x)
        if self.fk:
            rate, rate_next = here.log_rate, there.log_rate
            if control is not None:  # A_δ at both ends of the step, with the step's δb
                rate = rate + control.rate(state.x, score).to(rate.device)
                score_next = transition.summed_score(x, sigma, there.velocity * total, total)
                rate_next = rate_next + control.rate(x, score_next).to(rate.device)
            increment = transition.fk_log_increment(rate, rate_next, sigma_prev, sigma)
            if there.tie_log_prob is not None:  # ties: w_c·(log q_c,σ'(x') − log q_c,σ(x))
                increment = increment + there.tie_log_prob - here.tie_log_prob
            reset["fk_increment"] = increment
        return dataclasses.replace(state, x=x, here=there, **reset)

    def move(self, state: _State, k: int, sigma: float, generator: torch.Generator, *,
             with_potential: bool) -> _State:  # fmt: skip
        """M MCMC steps at σ_k; with the potential stage they keep π_σ·exp(φ_k) invariant."""
        if self.settings.mcmc_steps == 0:
            return state
        level = None
        if with_potential:
            cost = violation_cost(self.settings, k, len(self.scales))
            phi = level_potential(self.problem, self.calls, cost, state.scale)
            level = (phi, state.potential)
        x, here, potential, acceptance, own = _mcmc(
            self.settings, self.problem, state.x, state.here, self.target_at(sigma), sigma,
            generator, level, state.step_scale,
        )  # fmt: skip
        potential = state.potential if potential is None else potential
        return dataclasses.replace(state, x=x, here=here, potential=potential,
                                   acceptance=acceptance,
                                   step_scale=self.adapted(state.step_scale, own))  # fmt: skip

    def adapted(self, scale: float, acceptance: float) -> float:
        """The next level's step-size scale: log c += 2·(acceptance − target) for MH kernels
        (MALA 0.574, HMC 0.65: Roberts & Rosenthal 1998, Beskos et al. 2013), from this
        level's acceptance, so the kernel at each level is fixed given the past and every
        level's target stays invariant. Unadjusted kernels keep c."""
        target = TARGET_ACCEPTANCE.get(self.settings.mcmc)
        if not self.settings.adapt_step_size or target is None or math.isnan(acceptance):
            return scale
        return scale * math.exp(2.0 * (acceptance - target))

    def reweight(self, state: _State, k: int, sigma: float) -> tuple[_State, _Weighed]:
        """log w += FK increment + φ_k(x̂_0) − φ_{k−1}; log Z += log Σ W·exp(increment)."""
        problem, settings = self.problem, self.settings
        x0 = x0_from_velocity(state.x, sigma, state.here.velocity)
        cost = violation_cost(settings, k, len(self.scales))
        rewards, constraints = evaluate_potentials(problem, self.calls, x0, cost)
        base = state.log_w if state.fk_increment is None else state.log_w + state.fk_increment
        scale = _scale(settings, self.scales, k, base, rewards, constraints, state.potential,
                       state.scale)  # fmt: skip
        current = scale * rewards + constraints
        if settings.weighting == "level":
            inc = current
        else:
            inc = particles.log_increment(current, state.potential)
        if state.fk_increment is not None:
            inc = inc + state.fk_increment
        log_z = state.log_z + float(particles.log_mean_weight(state.log_w, inc))
        log_w = particles.sanitize(state.log_w + inc)
        check_alive(problem, self.calls, log_w, x0, k, sigma)
        best = _best(current, log_w)
        weighed = _Weighed(particles.ess_fraction(log_w), _spread(log_w), best,
                           x0[best].detach().cpu())  # fmt: skip
        state = dataclasses.replace(state, log_w=log_w, potential=current, log_z=log_z,
                                    scale=scale)  # fmt: skip
        return state, weighed

    def resample(self, state: _State, generator: torch.Generator) -> _State:
        """Resample when ESS/N < threshold (always at threshold 1)."""
        threshold = self.settings.ess_threshold
        if not (threshold >= 1 or particles.ess_fraction(state.log_w) < threshold):
            return state
        n = state.log_w.numel()
        return state.take(particles.resample(self.settings.resampling, state.log_w, n,
                                             generator=generator))  # fmt: skip

    def summary(self, k: int, sigma: float, weighed: _Weighed, state: _State,
                seconds: float, generator: torch.Generator, levels: int) -> LevelTrace:  # fmt: skip
        """The level's trace entry (and progress event), with the checkpoint after it."""
        return LevelTrace(
            k, sigma, weighed.ess, state.resampled, state.acceptance, weighed.spread,
            state.scale, state.log_z, self.calls.take_stats(), seconds, weighed.best,
            weighed.preview, state.checkpoint(k + 1, generator), levels,
        )  # fmt: skip


def _propose(problem: Problem, x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Constraint experts' proposals and projections at σ, in factor order."""
    for b in problem.proposers:
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        if b.info.supports(Capability.PROPOSE):
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            x = b.factor.expert.propose(x, sig, seed=seed)
        if b.info.supports(Capability.PROJECT):
            x = b.factor.expert.project(x, sig)
        if not isinstance(x, Tensor) or not torch.isfinite(x).all():
            raise ValueError(f"expert {b.name!r}: propose/project returned non-finite particles")
    return x


def _mcmc(
    settings: SamplerSettings,
    problem: Problem,
    x: Tensor,
    here: mcmc.TargetEval,
    target: mcmc.Target,
    sigma: float,
    generator: torch.Generator,
    level: tuple[Potential, Tensor] | None = None,
    scale: float | None = None,
) -> tuple[Tensor, mcmc.TargetEval, Tensor | None, float, float]:
    """M steps of the chosen kernel at σ, step-size scale ``scale`` (default: the settings').

    With ``level = (φ, φ(x))`` every move also passes the potential stage, so the moves keep
    π_σ·exp(φ) invariant. Returns (x, evaluation, φ at x or None, mean acceptance, mean
    acceptance of the kernel's own MH test; NaN when nothing was tested).
    """
    scale = settings.step_size if scale is None else scale
    eta = mcmc.step_size(settings.step_rule, scale, sigma, float(problem.total_weight.max()))
    phi = None if level is None else level[1]
    accepted: list[Tensor] = []
    own: list[Tensor] = []
    momentum = None
    for _ in range(settings.mcmc_steps):
        x_new, there, acc, momentum = _kernel_step(
            settings, x, here, target, eta, generator, momentum
        )
        if acc is not None:
            own.append(acc)
        if level is not None:
            phi_new = level[0](x0_from_velocity(x_new, sigma, there.velocity))
            x_new, there, phi, ok = mcmc.potential_stage(
                x, here, phi, x_new, there, phi_new, generator=generator
            )
            acc = ok if acc is None else acc & ok
            if momentum is not None:  # a rejected unadjusted-HMC move reverses its momentum
                momentum = mcmc.Momentum(mcmc.select(ok, momentum.p, -momentum.p))
        x, here = x_new, there
        if acc is not None:
            accepted.append(acc)
    rate = float(torch.stack(accepted).double().mean()) if accepted else math.nan
    own_rate = float(torch.stack(own).double().mean()) if own else math.nan
    return x, here, phi, rate, own_rate


def _kernel_step(
    settings: SamplerSettings,
    x: Tensor,
    here: mcmc.TargetEval,
    target: mcmc.Target,
    eta: float,
    generator: torch.Generator,
    momentum: mcmc.Momentum | None,
) -> tuple[Tensor, mcmc.TargetEval, Tensor | None, mcmc.Momentum | None]:
    """One move of the chosen kernel: (x', evaluation, per-particle acceptance, momentum)."""
    match settings.mcmc:
        case "ula":
            x, here, _ = mcmc.ula(x, here, target, eta, generator=generator)
            return x, here, None, None
        case "mala":
            x, here, acc = mcmc.mala(x, here, target, eta, generator=generator)
            return x, here, acc, None
        case "hmc":
            x, here, acc = mcmc.hmc(
                x, here, target, eta, generator=generator, leapfrog_steps=settings.leapfrog_steps
            )
            return x, here, acc, None
        case _:
            x, here, momentum = mcmc.uhmc(
                x, here, target, eta, generator=generator,
                leapfrog_steps=settings.leapfrog_steps, damping=settings.damping,
                momentum=momentum,
            )  # fmt: skip
            return x, here, None, momentum


def _scale(
    settings: SamplerSettings,
    scales: list[float],
    k: int,
    log_w: Tensor,
    rewards: Tensor,
    constraints: Tensor,
    previous: Tensor,
    scale_prev: float,
) -> float:
    """The tempering scale s_k: from the fixed schedule, or by bisection on the ESS."""
    if settings.tempering != "adaptive" or k == len(scales) - 1:
        return scales[k]

    def log_w_at(s: float) -> Tensor:
        return log_w + particles.log_increment(s * rewards + constraints, previous)

    return adaptive_scale(log_w_at, scale_prev, settings.tempering_ess)


def _spread(log_w: Tensor) -> float:
    finite = log_w[torch.isfinite(log_w)]
    return float(finite.max() - finite.min()) if finite.numel() else math.nan


def _best(potential: Tensor, log_w: Tensor) -> int:
    """The living particle with the highest potential (ties: highest weight, then lowest index)."""
    alive = ~torch.isneginf(log_w)
    key = torch.where(alive, potential, torch.full_like(potential, -torch.inf))
    top = key == key.max()
    return int(torch.argmax(torch.where(top, log_w, torch.full_like(log_w, -torch.inf))))


def _records(problem: Problem) -> tuple[ExpertRecord, ...]:
    return tuple(
        ExpertRecord(b.name, str(b.info.kind), b.info.model_id, b.info.revision)
        for b in (*problem.generative, *problem.ties, *problem.potentials)
    )
