"""The intermediate target π_σ ∝ Π_i p_{i,σ}^{w_i}·Π_c q_c,σ^{w_c} at a level, evaluated at a
batch: the experts' velocities combined into the averaged velocity, the summed score, the
summed log-density and, under the FK transition, the Feynman–Kac rate and the ties'
log-densities (``poegen.kernel.transition``). Conditional experts' velocities are pulled toward
their parents' first (``poegen.kernel.coupling``). One :func:`target_factory` per run; every expert
call goes through its :class:`~poegen.kernel.calls.ExpertCalls`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from poegen.kernel import mcmc, transition
from poegen.kernel.calls import Call, ExpertCalls
from poegen.kernel.coupling import coupled_velocities
from poegen.kernel.path import score_from_velocity
from poegen.kernel.problem import Problem
from poegen.kernel.spec import SamplerSettings


def target_factory(
    problem: Problem, calls: ExpertCalls, settings: SamplerSettings
) -> Callable[[float], mcmc.Target]:
    """π_σ at a level: summed masked scores, summed log-densities, the averaged velocity and,
    under the FK transition, the Feynman–Kac rate A(x, σ) and the ties' log-densities.

    Scored constraints (``problem.ties``) add w_c·score_c(x_σ, σ) to the score and
    w_c·log q_c,σ(x_σ) to the log-density; they do not move the velocity. Under FK they enter
    the weights through Σ_c w_c·log q_c,σ (``TargetEval.tie_log_prob``, see
    ``poegen.kernel.transition``), so they are called at every evaluation; under Euler only MCMC
    moves read them, and without moves they are not called.
    """
    g = len(problem.generative)
    fk = settings.transition == "fk"
    ties = problem.ties if problem.needs_score or fk else ()  # without a reader, nothing
    tie_weights = [b.factor.weight for b in ties]

    def at(sigma: float) -> mcmc.Target:
        def evaluate(x: Tensor) -> mcmc.TargetEval:
            sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
            jobs = [Call(b, "velocity", x, (sig,)) for b in problem.generative]
            jobs += [Call(b, "score", x, (sig,)) for b in ties if problem.needs_score]
            log_probs = (*problem.generative, *ties) if problem.needs_log_prob else ties * fk
            jobs += [Call(b, "log_prob", x, (sig,), per_sample_output=True) for b in log_probs]
            out = iter(calls.run(jobs))
            velocities = [next(out) for _ in range(g)]
            tie_scores = [next(out) for b in ties if problem.needs_score]
            densities = list(out)
            velocities = coupled_velocities(
                problem.couplings, problem.generative, calls, x, sig, velocities
            )
            velocity = weighted_sum(problem.masks, velocities)
            score = None
            if problem.needs_score:
                scores = [score_from_velocity(x, sig, v) for v in velocities]
                score = weighted_sum(problem.masks, scores)
                if ties:
                    score = score + weighted_sum(tie_weights, tie_scores)
            log_prob = tie_log_prob = None
            if problem.needs_log_prob:
                weights = [b.factor.weight for b in problem.generative] + tie_weights
                log_prob = weighted_sum(weights, densities)
            log_rate = None
            if fk:
                log_rate = transition.fk_log_rate(
                    x, sigma, velocities, list(problem.masks), problem.total_weight
                )
                if ties:
                    tie_log_prob = weighted_sum(tie_weights, densities[-len(ties) :])
                    tie_log_prob = tie_log_prob.detach().to("cpu", torch.float64)
            return mcmc.TargetEval(
                score, log_prob, velocity / problem.total_weight, log_rate, tie_log_prob
            )

        return evaluate

    return at


def weighted_sum(weights: Sequence[Tensor | float], terms: Sequence[Tensor]) -> Tensor:
    """Σ_i w_i·t_i (weights: masks of shape S, or scalars)."""
    return functools.reduce(operator.add, (w * t for w, t in zip(weights, terms, strict=True)))
