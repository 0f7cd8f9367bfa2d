"""poegen and its baselines, run through the kernel's public API at one expert-call budget.

**Budget.** One *evaluation* is one particle through one expert call: a generative expert's
velocity at one particle, or a discriminative/constraint expert's log-potential at one
particle (a batched call of B particles costs B). poegen with N particles, L transitions and
M MCMC steps per level costs, per particle,

    G·(1 + L·(1 + M))  +  P·L        (G generative experts, P reward and constraint experts)

(one velocity evaluation at σ = 1, then per level one after the transition and one per ULA
step; one potential evaluation per level). Each baseline gets the same total by choosing its
particle count; :func:`evaluations` checks every run's count against the kernel's trace.

Baselines (configuration of :func:`poegen.kernel.sample`, not reimplementations):

* ``euler``: poegen's own loop with ``transition="euler"`` (the default before
  ``transition="auto"``): Euler on the averaged velocity, the same moves and weights.
* ``fk_transition``: poegen's own loop with the FK transition without its control drift
  (``fk_control=False``): the corrector weights as in Skreta et al. 2025.

* ``summation``: Composable Diffusion (Liu et al. 2022): the kernel with the Euler transition,
  ``mcmc_steps=0`` and only the generative factors, i.e. Euler on the combined velocity and
  nothing else. It cannot use a black-box reward or a constraint, so it samples the generative
  product alone.
* ``best_of_k``: best-of-N search (Ma et al. 2025) as a distribution: draw N from the model's
  own sampler (Euler on the combined velocity, no moves, no corrector weights), score each draw
  once, split the draws into N/k groups of k and keep each group's best (total log-potential
  Σλr + Σlog 1_C). The returned set has N/k equally weighted samples; k = 4 (FK steering's
  particle count). Each returned sample is a draw of the best-of-k law, which is what a user of
  best-of-k gets per request.
* ``fk``: FK steering (Singhal et al. 2025) with its ``diff`` potential (increments of the
  reward of x̂_0 at λ = 1 throughout: ``tempering="constant"``), multinomial resampling when
  ESS/N < ½, weights carried in log space (the "fixed" FK), and no MCMC (``mcmc_steps=0``).
  Its stochastic sampler is the kernel's SDE transition, which carries no corrector weight for
  one generative expert (see :func:`fk_settings`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.bench import metrics
from poegen.bench.tasks import Task
from poegen.kernel import Capability, ExpertKind, Factor, SamplerSettings, sample
from poegen.kernel.schedule import sigmas_for

METHODS = ("poegen", "euler", "fk_transition", "summation", "best_of_k", "fk")
BEST_OF_K = 4


@dataclass(frozen=True)
class Run:
    """What a method returned, with its cost.

    Attributes:
        method: one of ``METHODS``.
        particles: ``(n, *S)``.
        log_weights: normalised log-weights ``(n,)``, or ``None`` for equal weights.
        log_evidence: the kernel's log Z estimate (NaN where the method has none).
        best: the returned best particle ``(*S,)`` (poegen: the kernel's best index).
        evaluations: evaluations per expert name (see the module docstring).
        num_particles: particles the method ran (before any best-of selection).
        seconds: wall-clock seconds.
        log_z_of_product: whether ``log_evidence`` estimates log Z of the whole product
            (the FK transition) rather than log E_q[potentials] under the generative product.
    """

    method: str
    particles: Tensor
    log_weights: Tensor | None
    log_evidence: float
    best: Tensor | None
    evaluations: dict[str, int]
    num_particles: int
    seconds: float
    log_z_of_product: bool = False

    @property
    def total_evaluations(self) -> int:
        return sum(self.evaluations.values())


def num_transitions(settings: SamplerSettings) -> int:
    """L: the kernel runs one transition between consecutive positive noise levels."""
    return sum(1 for s in sigmas_for(settings).tolist() if s > 0) - 1


def cost_per_particle(
    settings: SamplerSettings, generative: int, potentials: int, ties: int = 0
) -> int:
    """Evaluations per particle of one kernel run.

    The target is evaluated E = 1 + L + K·M·ℓ times (once at σ = 1, after each of the L
    transitions, after each of the ℓ leapfrog steps of each of the M moves at each of the K
    levels; K = L, or 1 for a one-step grid; ℓ = 1 but for HMC and UHMC). Each generative
    expert answers every evaluation with its velocity, and with its log-density too under an
    MH kernel (MALA, HMC: h = 1); each scored constraint (tie) gives its score at every
    evaluation when there are moves and its log-density at every evaluation under FK or an MH
    kernel; each other potential is called once per level and once per move when the moves see
    it (``mcmc_rewards``)::

        G·E·(1 + h) + T·E·([M > 0] + [FK or h]) + P·K·(1 + M')
    """
    transitions = num_transitions(settings)
    levels = max(transitions, 1)
    moves = settings.mcmc_steps
    leapfrog = settings.leapfrog_steps if settings.mcmc in ("hmc", "uhmc") else 1
    evaluations = 1 + transitions + levels * moves * leapfrog
    metropolis = settings.mcmc in ("mala", "hmc") and moves > 0  # reads log-densities
    moves_see_potentials = settings.mcmc_rewards and potentials > 0 and moves > 0
    potential_calls = 1 + (moves if moves_see_potentials else 0)
    tie_reads = (moves > 0) + (settings.transition == "fk" or metropolis)
    return (
        generative * evaluations * (1 + metropolis)
        + ties * evaluations * tie_reads
        + potentials * levels * potential_calls
    )


def factor_counts(task: Task, factors: tuple[Factor, ...] | None = None) -> tuple[int, int, int]:
    """(G, P, T): generative experts, potentials (rewards and constraints that are not ties),
    and scored constraints (ties) among ``factors`` (default: the task's)."""
    factors = task.factors if factors is None else factors
    kinds = [f.expert.describe() for f in factors]
    generative = sum(k.kind == ExpertKind.GENERATIVE for k in kinds)
    ties = sum(k.kind == ExpertKind.CONSTRAINT and k.supports(Capability.SCORE) for k in kinds)
    return generative, len(kinds) - generative - ties, ties


def budget(task: Task, settings: SamplerSettings | None = None) -> int:
    """poegen's total evaluations on ``task``."""
    settings = settings or task.settings
    return settings.num_particles * cost_per_particle(settings, *factor_counts(task))


def evaluations(result) -> dict[str, int]:
    """Evaluations (samples) per expert from the kernel's trace."""
    calls = metrics.expert_calls(result.trace)
    return {name: c["evaluations"] for name, c in calls.items()}


def _sample(factors: tuple[Factor, ...], task: Task, settings: SamplerSettings, seed: int, dtype):
    return sample(
        factors,
        task.sample_shape,
        settings,
        generator=torch.Generator().manual_seed(seed),
        dtype=dtype,
    )


def _checked(
    result, task: Task, settings: SamplerSettings, factors: tuple[Factor, ...] | None = None
) -> dict[str, int]:
    got = evaluations(result)
    counts = factor_counts(task, factors)
    want = settings.num_particles * cost_per_particle(settings, *counts)
    if sum(got.values()) != want:
        raise RuntimeError(f"budget accounting: trace has {got}, expected {want} in total")
    return got


def run_poegen(
    task: Task, seed: int, settings: SamplerSettings | None = None, *, dtype=torch.float64
) -> Run:
    settings = settings or task.settings
    start = time.perf_counter()
    result = _sample(task.factors, task, settings, seed, dtype)
    seconds = time.perf_counter() - start
    return Run(
        "poegen",
        result.particles,
        result.log_weights,
        result.log_evidence,
        result.best,
        _checked(result, task, settings),
        settings.num_particles,
        seconds,
        result.transition == "fk",
    )


def _particles_for(total: int, per_particle: int, multiple: int = 1) -> int:
    n = max(multiple, total // per_particle)
    return n - n % multiple


def run_summation(task: Task, seed: int, total: int, *, dtype=torch.float64) -> Run:
    """Composable Diffusion: generative factors only, Euler, ``mcmc_steps=0``, same budget."""
    base = model_sampler(task.settings)
    n = _particles_for(total, cost_per_particle(base, len(task.generative), 0))
    settings = base.model_copy(update={"num_particles": n})
    start = time.perf_counter()
    result = _sample(task.generative, task, settings, seed, dtype)
    seconds = time.perf_counter() - start
    return Run(
        "summation",
        result.particles,
        None,
        math.nan,
        None,
        _checked(result, task, settings, task.generative),
        n,
        seconds,
    )


def log_potential(task: Task, x: Tensor) -> Tensor:
    """Σ_j λ_j r_j(x) + Σ_c log 1_C(x) per sample, ``(n,)`` float64 (the tilt of the target)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for f in (*task.rewards, *task.constraints):
        value = f.expert.log_potential(x).to(torch.float64)
        total += torch.where(torch.isneginf(value), value, f.weight * value)
    return total


def run_best_of_k(
    task: Task, seed: int, total: int, *, k: int = BEST_OF_K, dtype=torch.float64
) -> Run:
    """Best-of-k per returned sample, from the model's own sampler (Euler on v̄, no moves)."""
    potentials = task.rewards + task.constraints
    base = model_sampler(task.settings)
    per = cost_per_particle(base, len(task.generative), 0) + len(potentials)
    n = _particles_for(total, per, multiple=k)
    settings = base.model_copy(update={"num_particles": n})
    start = time.perf_counter()
    result = _sample(task.generative, task, settings, seed, dtype)
    draws = result.particles  # no potentials: equal weights, never resampled
    score = log_potential(task, draws)
    groups = score.reshape(n // k, k)
    keep = torch.arange(n // k) * k + groups.argmax(1)
    seconds = time.perf_counter() - start
    calls = _checked(result, task, settings, task.generative)
    calls |= {f.name or f.expert.describe().name: n for f in potentials}
    chosen = draws[keep]
    return Run(
        "best_of_k",
        chosen,
        None,
        math.nan,
        chosen[int(score[keep].argmax())],
        calls,
        n,
        seconds,
    )


def model_sampler(settings: SamplerSettings) -> SamplerSettings:
    """The flow's own deterministic sampler: Euler on the (averaged) velocity, no MCMC, no
    corrector weights."""
    return settings.model_copy(update={"mcmc_steps": 0, "transition": "euler"})


def fk_settings(task: Task, num_particles: int) -> SamplerSettings:
    """FK steering's sampler: its stochastic step is the kernel's SDE transition, which with
    one generative expert (β = 1) carries no corrector weight (A ≡ 0); a product of several
    has no sampler of its own in FK steering, so it gets Euler on the averaged velocity."""
    stochastic = (
        len(task.generative) == 1
        and task.generative[0].weight == 1
        and (task.generative[0].region is None)
    )
    return task.settings.model_copy(
        update={
            "transition": "fk" if stochastic else "euler",
            "sde_noise": 1.0,
            "mcmc_steps": 0,
            "tempering": "constant",
            "resampling": "multinomial",
            "ess_threshold": 0.5,
            "num_particles": num_particles,
        }
    )


def run_fk(task: Task, seed: int, total: int, *, dtype=torch.float64) -> Run:
    """FK steering (diff potential, multinomial, ESS < ½, no MCMC) at the same budget."""
    probe = fk_settings(task, 1)
    n = _particles_for(total, cost_per_particle(probe, *factor_counts(task)))
    settings = fk_settings(task, n)
    start = time.perf_counter()
    result = _sample(task.factors, task, settings, seed, dtype)
    seconds = time.perf_counter() - start
    return Run(
        "fk",
        result.particles,
        result.log_weights,
        result.log_evidence,
        result.best,
        _checked(result, task, settings),
        n,
        seconds,
        settings.transition == "fk",
    )


def run_euler(task: Task, seed: int, *, dtype=torch.float64) -> Run:
    """poegen with the Euler transition (the default before ``transition="auto"``): the same
    moves, weights and budget, no corrector weights on the generative product."""
    settings = task.settings.model_copy(update={"transition": "euler"})
    run = run_poegen(task, seed, settings, dtype=dtype)
    return dataclasses.replace(run, method="euler")


def run_fk_transition(task: Task, seed: int, *, dtype=torch.float64) -> Run:
    """poegen with the FK transition without its control drift (``fk_control=False``): the
    same moves, weights and budget (the corrector weights cost no call)."""
    settings = task.settings.model_copy(update={"transition": "fk", "fk_control": False})
    run = run_poegen(task, seed, settings, dtype=dtype)
    return dataclasses.replace(run, method="fk_transition")


def applicable(task: Task) -> tuple[str, ...]:
    """Methods that differ on this task: without potentials, best-of-k and FK steering are
    undefined."""
    methods = METHODS
    if not (task.rewards or task.constraints):
        methods = tuple(m for m in methods if m not in ("best_of_k", "fk"))
    return methods


def run(method: str, task: Task, seed: int, total: int, *, dtype=torch.float64) -> Run:
    match method:
        case "poegen":
            return run_poegen(task, seed, dtype=dtype)
        case "euler":
            return run_euler(task, seed, dtype=dtype)
        case "fk_transition":
            return run_fk_transition(task, seed, dtype=dtype)
        case "summation":
            return run_summation(task, seed, total, dtype=dtype)
        case "best_of_k":
            return run_best_of_k(task, seed, total, dtype=dtype)
        case "fk":
            return run_fk(task, seed, total, dtype=dtype)
    raise ValueError(f"method: unknown method {method!r} (known: {', '.join(METHODS)})")
