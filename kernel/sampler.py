"""The annealed MCMC + SMC sampler over a product of experts.

Target (see ``poegen.kernel.experts`` for the three kinds of factor)::

    p(x) ∝ Π_i p_i(x)^{w_i} · Π_j exp(λ_j·r_j(x)) · Π_k 1[x ∈ C_k]

Pseudo-code of :func:`sample_iter` (N particles, noise levels 1 = σ_0 > σ_1 > … > σ_L > 0;
π_k ∝ Π_i p_{i,σ_k}^{w_i} is the product of the noised generative experts)::

    x ~ N(0, I)
    for k = 1 … L:
        x ← x + (σ_k − σ_{k−1})·v̄(x, σ_{k−1})          # transition: Euler on the combined flow
        x ← propose/project(x, σ_k)                     # constraint experts that move particles
        φ_k ← s_k·Σ_j λ_j·r_j(x̂_0(x)) + Σ_c log C_c(x̂_0(x))   # s_k: reward tempering scale
        log w ← log w + φ_k − φ_{k−1}                    # "incremental"; "level" adds φ_k
        log Z ← log Z + log Σ_i W_i·exp(φ_k − φ_{k−1})
        if ESS/N < threshold: resample (x, φ_k, v̄ follow their ancestors), log w ← 0
        x ← MCMC^M(x; π_k·exp(φ_k))                     # summed scores + a potential stage
    return x̂_0 at σ_L, normalised log w, log Z, the best particle, the trace

This is an SMC sampler (Del Moral, Doucet & Jasra 2006) whose transport is the flow: the
Euler step carries π_{k−1} to (approximately) π_k, so exp(φ_k − φ_{k−1}) is the incremental
weight from π_{k−1}·exp(φ_{k−1}) to π_k·exp(φ_k), taken *before* the moves; the moves then keep
π_k·exp(φ_k) invariant, rejuvenate resampled copies, and correct what the transition got wrong
about the product (without them summed-score sampling reaches the wrong law, Du et al. 2023).
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
used (the weights would count it twice); its proposals and projections still run. Stiff ties
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
* transition velocity: v̄ = Σ_i w_i·m_i ⊙ v_i / W, the per-coordinate weighted average
  (MultiDiffusion's rule); with Σ_i w_i = 1 and no regions it is exactly the summed-score flow
  (Composable Diffusion), and the MCMC corrects the rest.

With ``mcmc_steps=0`` and no discriminative or constraint factor, the sampler is plain
summed-score (Composable-Diffusion-style) Euler sampling.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.kernel import mcmc, particles
from poegen.kernel.calls import BoundFactor, Call, ExpertCalls, ExpertStats
from poegen.kernel.experts import Capability, ExpertKind, check_expert
from poegen.kernel.path import euler_step, score_from_velocity, x0_from_velocity
from poegen.kernel.schedule import adaptive_scale, checked_grid, reward_scales, sigmas_for
from poegen.kernel.spec import Factor, SamplerSettings


class AllParticlesDiedError(RuntimeError):
    """Every particle got zero weight at one level."""


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
        log_evidence: estimate of log E_q[Π_j exp(λ_j r_j)·Π_k 1[C_k]], q the generative
            product as the chain reaches it (exact up to the Euler transport and, for ULA, the
            O(η) bias of the moves; 0 without discriminative and constraint factors).
        best_index: the living particle with the highest total log-potential (the paper's
            output; not a sample from p).
        trace: one entry per level.
        experts: the experts that served the run.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: float
    best_index: int
    trace: tuple[LevelTrace, ...]
    experts: tuple[ExpertRecord, ...]

    @property
    def best(self) -> Tensor:
        return self.particles[self.best_index]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def draws(self, n: int, *, generator: torch.Generator) -> Tensor:
        """n equally weighted draws from the weighted set (systematic resampling)."""
        return self.particles[particles.systematic(self.log_weights, n, generator=generator)]


@dataclass(frozen=True, slots=True)
class _Problem:
    """The validated factors of one run, split by kind, with their masks."""

    generative: tuple[BoundFactor, ...]
    potentials: tuple[BoundFactor, ...]  # discriminative and constraint
    proposers: tuple[BoundFactor, ...]
    ties: tuple[BoundFactor, ...]  # constraints with an exact noised score: inside π_σ
    masks: tuple[Tensor, ...]  # w_i·m_i per generative factor, shape S
    total_weight: Tensor  # W(c), shape S
    needs_log_prob: bool
    needs_score: bool  # only MCMC moves read the score (and the ties' scores)
    pixels: PixelSource | None = None  # how pixel-input potentials see x̂_0; None: none of them


@dataclass(frozen=True, slots=True)
class PixelSource:
    """Where pixel-input potentials get their pixels: the decoder of the generative experts'
    latent space (an expert with ``AUTOENCODER``), or ``None`` for pixel-space experts."""

    decoder: BoundFactor | None


def sample(
    factors: Sequence[Factor],
    sample_shape: Sequence[int],
    settings: SamplerSettings | None = None,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    callback: Callable[[LevelTrace], None] | None = None,
) -> SampleResult:
    """Sample from the product of ``factors``; see :func:`sample_iter`."""
    run = sample_iter(
        factors, sample_shape, settings, generator=generator, dtype=dtype, device=device
    )
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
) -> Generator[LevelTrace, None, SampleResult]:
    """Yield one :class:`LevelTrace` per level; return the :class:`SampleResult`.

    All randomness comes from ``generator`` (drawn on the CPU, moved to ``device``), so the
    same seed gives the same result. Closing the generator early stops the run.
    """
    settings = settings or SamplerSettings()
    shape = _check_shape(sample_shape)
    problem = _build_problem(factors, shape, settings, dtype, device)
    sigmas = [float(s) for s in _noise_grid(settings, problem, shape) if s > 0]
    if len(sigmas) < 2:
        raise ValueError("num_steps: the noise grid needs a level strictly between 0 and 1")
    scales = reward_scales(settings, len(sigmas) - 1).tolist()
    n = settings.num_particles
    experts = [*problem.generative, *problem.ties, *problem.potentials]
    with ExpertCalls(experts, settings.max_batch) as calls:
        target_at = _target_factory(problem, calls)
        x = torch.randn((n, *shape), generator=generator, dtype=dtype).to(device)
        here = target_at(sigmas[0])(x)
        log_w = torch.zeros(n, dtype=torch.float64)
        previous = torch.zeros(n, dtype=torch.float64)  # φ_{k−1} per particle
        log_z, scale, trace = 0.0, 0.0, []
        moves_see_potentials = (
            settings.mcmc_rewards and bool(problem.potentials) and settings.mcmc_steps > 0
        )
        for k, (sigma_prev, sigma) in enumerate(itertools.pairwise(sigmas)):
            started = time.perf_counter()
            x = euler_step(x, sigma_prev, sigma, here.velocity)
            x = _propose(problem, x, sigma, generator)
            target = target_at(sigma)
            here, acceptance = target(x), math.nan
            if not moves_see_potentials:  # path bookkeeping: move first, weigh after
                x, here, _, acceptance = _mcmc(settings, problem, x, here, target, sigma, generator)
            x0 = x0_from_velocity(x, sigma, here.velocity)
            penalty = _penalty(settings, k, len(scales))
            rewards, constraints = _potentials(problem, calls, x0, k, sigma, penalty)
            scale = _scale(settings, scales, k, log_w, rewards, constraints, previous, scale)
            current = scale * rewards + constraints
            inc = (
                current
                if settings.weighting == "level"
                else particles.log_increment(current, previous)
            )
            log_z += float(particles.log_mean_weight(log_w, inc))
            log_w = particles.sanitize(log_w + inc)
            _check_alive(problem, calls, log_w, x0, k, sigma)
            ess = particles.ess_fraction(log_w)
            spread = _spread(log_w)
            best = _best(current, log_w)
            preview = x0[best].detach().cpu()
            resampled = settings.ess_threshold >= 1 or ess < settings.ess_threshold
            if resampled:
                idx = particles.resample(settings.resampling, log_w, n, generator=generator)
                x, x0, current = x[idx], x0[idx], current[idx]
                here = _take(here, idx)
                log_w = torch.zeros(n, dtype=torch.float64)
            if moves_see_potentials:  # resample-move: the moves keep π_σ·exp(φ_k) invariant
                level = (_level_potential(problem, calls, k, sigma, penalty, scale), current)
                x, here, current, acceptance = _mcmc(
                    settings, problem, x, here, target, sigma, generator, level
                )
                x0 = x0_from_velocity(x, sigma, here.velocity)
            previous = current
            trace.append(
                LevelTrace(k, sigma, ess, resampled, acceptance, spread, scale, log_z,
                           calls.take_stats(), time.perf_counter() - started, best, preview)
            )  # fmt: skip
            yield trace[-1]
    log_w = particles.normalize(log_w)
    return SampleResult(x0, log_w, log_z, _best(previous, log_w), tuple(trace), _records(problem))


def _check_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"sample_shape: needs positive dimensions, got {tuple(sample_shape)}")
    return shape


def _noise_grid(settings: SamplerSettings, problem: _Problem, shape: tuple[int, ...]) -> Tensor:
    """The settings' grid, or with ``schedule="expert"`` the first generative expert's own."""
    if settings.sigmas is not None or settings.schedule != "expert":
        return sigmas_for(settings)
    for b in problem.generative:
        if b.info.supports(Capability.SCHEDULE):
            levels = b.factor.expert.schedule(settings.num_steps, shape)  # type: ignore[attr-defined]
            return checked_grid(levels, settings.num_steps, f"expert {b.name!r}")
    raise ValueError("schedule: 'expert' needs a generative expert that answers schedule()")


def _build_problem(
    factors: Sequence[Factor],
    shape: tuple[int, ...],
    settings: SamplerSettings,
    dtype: torch.dtype,
    device: torch.device | str,
) -> _Problem:
    """Validate the factors against each other and the settings; split them by kind."""
    bound = [_bind(i, f, shape) for i, f in enumerate(factors)]
    names = [b.name for b in bound]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"factors: duplicate factor names {dup}; give each a distinct name=")
    generative = tuple(b for b in bound if b.info.kind == ExpertKind.GENERATIVE)
    if not generative:
        raise ValueError("factors: at least one generative expert is needed")
    spaces = {b.info.latent_space for b in generative if b.info.latent_space}
    if len(spaces) > 1:
        raise ValueError(
            f"factors: generative experts must share one latent space, got {sorted(spaces)}"
        )
    masks = tuple(_mask(b, shape, dtype, device) for b in generative)
    total = torch.stack(masks).sum(0)
    if (total <= 0).any():
        raise ValueError(
            "factors: every coordinate needs a positive total generative weight Σ w_i·m_i; "
            f"{int((total <= 0).sum())} coordinates have none (check regions and weights)"
        )
    needs_log_prob = settings.mcmc in ("mala", "hmc") and settings.mcmc_steps > 0
    for b in generative:
        if needs_log_prob and not b.info.supports(Capability.LOG_PROB):
            raise ValueError(
                f"mcmc: {settings.mcmc!r} needs log_prob from every generative expert; "
                f"{b.name!r} gives none (use 'ula' or 'uhmc')"
            )
        if needs_log_prob and b.factor.region is not None:
            raise ValueError(f"mcmc: {settings.mcmc!r} cannot use the regional expert {b.name!r}")
    for b in bound:
        if b.info.kind == ExpertKind.CONSTRAINT and b.factor.weight <= 0:
            raise ValueError(f"weight: constraint {b.name!r} needs a positive weight")
    ties = tuple(
        b
        for b in bound
        if b.info.kind == ExpertKind.CONSTRAINT and b.info.supports(Capability.SCORE)
    )
    for b in ties:
        if needs_log_prob and not b.info.supports(Capability.LOG_PROB):
            raise ValueError(
                f"mcmc: {settings.mcmc!r} needs log_prob from the scored constraint {b.name!r}, "
                "which gives none (use 'ula' or 'uhmc')"
            )
    potentials = tuple(b for b in bound if b.info.kind != ExpertKind.GENERATIVE and b not in ties)
    proposers = tuple(
        b
        for b in bound
        if b.info.kind != ExpertKind.GENERATIVE
        and (b.info.supports(Capability.PROPOSE) or b.info.supports(Capability.PROJECT))
    )
    pixels = _pixel_source(generative, potentials, shape)
    needs_score = settings.mcmc_steps > 0
    return _Problem(
        generative, potentials, proposers, ties, masks, total, needs_log_prob, needs_score, pixels
    )


def _pixel_source(
    generative: tuple[BoundFactor, ...], potentials: tuple[BoundFactor, ...], shape: tuple[int, ...]
) -> PixelSource | None:
    """How pixel-input potentials will see x̂_0; ``ValueError`` when they cannot.

    All generative experts must name the same latent space (unnamed counts as a name). The
    first of them with an autoencoder decodes; with none, the space must be pixels in [-1, 1]
    (unnamed, or named ``pixels…``) of shape (C, H, W) or (C, F, H, W).
    """
    readers = [b.name for b in potentials if b.info.pixel_input]
    if not readers:
        return None
    spaces = sorted({b.info.latent_space for b in generative})
    if len(spaces) > 1:
        raise ValueError(
            f"factors: pixel-input expert {readers[0]!r} needs one latent space to decode, but "
            f"the generative experts have {spaces}"
        )
    for b in generative:
        if b.info.supports(Capability.AUTOENCODER):
            return PixelSource(b)
    if spaces[0] and not spaces[0].startswith("pixels"):
        raise ValueError(
            f"factors: pixel-input expert {readers[0]!r} needs pixels, but no generative expert "
            f"of latent space {spaces[0]!r} has an autoencoder to decode x̂_0"
        )
    if len(shape) not in (3, 4):
        raise ValueError(
            f"factors: pixel-input expert {readers[0]!r} needs pixels, but the samples {shape} "
            "are neither (C, H, W) nor (C, F, H, W) and no generative expert decodes them"
        )
    return PixelSource(None)


def _bind(index: int, factor: Factor, shape: tuple[int, ...]) -> BoundFactor:
    if not isinstance(factor, Factor):
        raise TypeError(f"factors[{index}]: expected Factor, got {type(factor).__name__}")
    info = check_expert(factor.expert)
    if info.sample_shape is not None and tuple(info.sample_shape) != shape:
        raise ValueError(
            f"sample_shape: {shape} does not match expert {info.name!r}'s {info.sample_shape}"
        )
    if factor.region is not None and info.kind != ExpertKind.GENERATIVE:
        raise ValueError(f"factors[{index}].region: only generative experts take a region")
    return BoundFactor(factor, info, factor.name or info.name)


def _mask(b: BoundFactor, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """w_i·m_i over the sample shape (m_i = 1 without a region)."""
    region = b.factor.region
    if region is None:
        return torch.full(shape, b.factor.weight, dtype=dtype, device=device)
    region = torch.as_tensor(region, dtype=dtype, device=device)
    if tuple(region.shape) != shape:
        raise ValueError(f"region: factor {b.name!r} has shape {tuple(region.shape)}, not {shape}")
    if not torch.isfinite(region).all() or (region < 0).any() or (region > 1).any():
        raise ValueError(f"region: factor {b.name!r} needs values in [0, 1]")
    return b.factor.weight * region


def _target_factory(problem: _Problem, calls: ExpertCalls) -> Callable[[float], mcmc.Target]:
    """π_σ at a level: summed masked scores, summed log-densities, the averaged velocity.

    Scored constraints (``problem.ties``) add w_c·score_c(x_σ, σ) to the score and
    w_c·log q_c,σ(x_σ) to the log-density; they do not move the transition's velocity. Only
    MCMC moves read the score: without them it is not formed and the ties are not called.
    """
    g = len(problem.generative)
    ties = problem.ties if problem.needs_score else ()  # without moves, ties change nothing

    def at(sigma: float) -> mcmc.Target:
        def evaluate(x: Tensor) -> mcmc.TargetEval:
            sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
            jobs = [Call(b, "velocity", x, (sig,)) for b in problem.generative]
            jobs += [Call(b, "score", x, (sig,)) for b in ties]
            if problem.needs_log_prob:
                jobs += [
                    Call(b, "log_prob", x, (sig,), per_sample_output=True)
                    for b in (*problem.generative, *ties)
                ]
            out = calls.run(jobs)
            velocities, tie_scores = out[:g], out[g : g + len(ties)]
            velocity = _weighted_sum(problem.masks, velocities)
            score = None
            if problem.needs_score:
                scores = [score_from_velocity(x, sig, v) for v in velocities]
                scores += tie_scores
                weights = [*problem.masks, *(b.factor.weight for b in ties)]
                score = _weighted_sum(weights, scores)
            log_prob = None
            if problem.needs_log_prob:
                weights = [b.factor.weight for b in (*problem.generative, *ties)]
                log_prob = _weighted_sum(weights, out[g + len(ties) :])
            return mcmc.TargetEval(score, log_prob, velocity / problem.total_weight)

        return evaluate

    return at


def _weighted_sum(weights: Sequence[Tensor | float], terms: Sequence[Tensor]) -> Tensor:
    """Σ_i w_i·t_i (weights: masks of shape S, or scalars)."""
    return functools.reduce(operator.add, (w * t for w, t in zip(weights, terms, strict=True)))


def _propose(problem: _Problem, x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
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


Potential = Callable[[Tensor], Tensor]  # x̂_0 (N, *S) → φ (N,) float64 at one level


def _mcmc(
    settings: SamplerSettings,
    problem: _Problem,
    x: Tensor,
    here: mcmc.TargetEval,
    target: mcmc.Target,
    sigma: float,
    generator: torch.Generator,
    level: tuple[Potential, Tensor] | None = None,
) -> tuple[Tensor, mcmc.TargetEval, Tensor | None, float]:
    """M steps of the chosen kernel at σ.

    With ``level = (φ, φ(x))`` every move also passes the potential stage, so the moves keep
    π_σ·exp(φ) invariant. Returns (x, evaluation, φ at x or None, mean acceptance; NaN when
    nothing was ever tested).
    """
    eta = mcmc.step_size(
        settings.step_rule, settings.step_size, sigma, float(problem.total_weight.max())
    )
    phi = None if level is None else level[1]
    accepted: list[Tensor] = []
    momentum = None
    for _ in range(settings.mcmc_steps):
        x_new, there, acc, momentum = _kernel_step(
            settings, x, here, target, eta, generator, momentum
        )
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
    return x, here, phi, rate


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


def _level_potential(
    problem: _Problem, calls: ExpertCalls, k: int, sigma: float, penalty: float, scale: float
) -> Potential:
    """φ_k(x̂_0) = s_k·Σ_j λ_j r_j(x̂_0) + constraint terms, for the potential stage."""

    def phi(x0: Tensor) -> Tensor:
        rewards, constraints = _potentials(problem, calls, x0, k, sigma, penalty)
        return scale * rewards + constraints

    return phi


def _penalty(settings: SamplerSettings, k: int, num_levels: int) -> float:
    """What a violated hard constraint costs at level k: −inf at the last level only."""
    if k == num_levels - 1:
        return math.inf
    return settings.constraint_penalty * (k + 1) / num_levels


def _potentials(
    problem: _Problem, calls: ExpertCalls, x0: Tensor, step: int, sigma: float, penalty: float
) -> tuple[Tensor, Tensor]:
    """(Σ_j λ_j·r_j(x̂_0), Σ_c w_c·log C_c(x̂_0)), each ``(N,)`` float64; a violated hard
    constraint (−inf) counts −``penalty``."""
    n = x0.shape[0]
    rewards = torch.zeros(n, dtype=torch.float64)
    constraints = torch.zeros(n, dtype=torch.float64)
    for b, value in zip(problem.potentials, _potential_values(problem, calls, x0), strict=True):
        value = value.detach().to("cpu", torch.float64)
        if torch.isnan(value).any() or torch.isposinf(value).any():
            raise ValueError(
                f"expert {b.name!r}: log_potential returned NaN or +inf at level {step} "
                f"(sigma={sigma:.4g})"
            )
        if b.info.kind == ExpertKind.DISCRIMINATIVE:
            rewards += b.factor.weight * value
        else:
            violated = torch.full_like(value, -penalty)
            constraints += torch.where(torch.isneginf(value), violated, b.factor.weight * value)
    return rewards, constraints


def _potential_values(problem: _Problem, calls: ExpertCalls, x0: Tensor) -> list[Tensor]:
    """Each potential's ``log_potential``, in factor order: of x̂_0, or for pixel-input
    experts of its pixels, decoded once and shared by all of them."""
    pixels = None if problem.pixels is None else _decode_pixels(problem.pixels, calls, x0)
    jobs = [
        Call(b, "log_potential", pixels if b.info.pixel_input else x0, per_sample_output=True)
        for b in problem.potentials
    ]
    return calls.run(jobs)


def _decode_pixels(source: PixelSource, calls: ExpertCalls, x0: Tensor) -> Tensor:
    """pixels = clamp((D(x̂_0) + 1)/2, 0, 1), D the decoder ([-1, 1] out; identity in pixel
    space), shape (N, C, H, W) or (N, C, F, H, W)."""
    decoded = x0
    if source.decoder is not None:
        decoded = calls.run([Call(source.decoder, "decode", x0, any_sample_shape=True)])[0]
        if decoded.ndim not in (4, 5) or not torch.isfinite(decoded).all():
            raise ValueError(
                f"expert {source.decoder.name!r}: decode() returned shape {tuple(decoded.shape)} "
                "or non-finite pixels; expected finite (N, C, H, W) or (N, C, F, H, W)"
            )
    return ((decoded + 1) / 2).clamp(0, 1)


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


def _check_alive(
    problem: _Problem, calls: ExpertCalls, log_w: Tensor, x0: Tensor, step: int, sigma: float
) -> None:
    """Raise naming the level and the factor that killed the last particles."""
    if not torch.isneginf(log_w).all():
        return
    deaths = {
        b.name: int(torch.isneginf(v).sum())
        for b, v in zip(problem.potentials, _potential_values(problem, calls, x0), strict=True)
    }
    culprits = [name for name, d in sorted(deaths.items(), key=lambda kv: -kv[1]) if d > 0]
    detail = ", ".join(f"{name!r} ({deaths[name]} of {x0.shape[0]})" for name in culprits)
    raise AllParticlesDiedError(
        f"every particle has zero weight at level {step} (sigma={sigma:.4g}); "
        f"violated by: {detail or 'no single factor (weights underflowed)'}"
    )


def _spread(log_w: Tensor) -> float:
    finite = log_w[torch.isfinite(log_w)]
    return float(finite.max() - finite.min()) if finite.numel() else math.nan


def _best(potential: Tensor, log_w: Tensor) -> int:
    """The living particle with the highest potential (ties: highest weight, then lowest index)."""
    alive = ~torch.isneginf(log_w)
    key = torch.where(alive, potential, torch.full_like(potential, -torch.inf))
    top = key == key.max()
    return int(torch.argmax(torch.where(top, log_w, torch.full_like(log_w, -torch.inf))))


def _take(evaluation: mcmc.TargetEval, idx: Tensor) -> mcmc.TargetEval:
    log_prob = None if evaluation.log_prob is None else evaluation.log_prob[idx]
    score = None if evaluation.score is None else evaluation.score[idx]
    return mcmc.TargetEval(score, log_prob, evaluation.velocity[idx])


def _records(problem: _Problem) -> tuple[ExpertRecord, ...]:
    return tuple(
        ExpertRecord(b.name, str(b.info.kind), b.info.model_id, b.info.revision)
        for b in (*problem.generative, *problem.ties, *problem.potentials)
    )
