"""Analytic experts with exact answers, so that sampler accuracy is measured, not guessed.

Experts (the ``poegen.experts`` entry points):

* ``GaussianMixture``: generative; exact ``velocity``, ``score``, ``log_prob`` (and ``denoise``)
  at every σ of the rectified-flow path x_σ = (1 − σ)x₀ + σε, plus exact clean ``sample``.
* ``LinearReward``, ``QuadraticReward``, ``SigmoidReward``: discriminative ``log_potential``.
* ``HalfSpace`` (nᵀx ≤ offset), ``Box`` (low ≤ x ≤ high): constraint indicators.

Exact targets (``closed_form``, ``targets``): ``exact_target(factors)`` turns a list of
``poegen.kernel.spec.Factor`` into the exact law of the product (``ExactTarget``: exact
samples, log-density, log Z, moments, mode weights and assignment), or raises
``NotImplementedError`` where no closed form exists; ``product``, ``tilt`` and ``truncate`` are
its steps, ``expected_reward`` gives E_target[r]. ``tasks`` builds the benchmark's experts
(R3's ring and bar, DAS's grid and ring tasks).

Conventions: parameters are held in float64 on the CPU; expert calls follow the input's dtype
(float64, or float32 for lower precisions) and device; samples and target quantities are
float64. Randomness only through an explicit ``torch.Generator``.
"""

from poegen.expert_servers.analytic.closed_form import exact_target, product, tilt, truncate
from poegen.expert_servers.analytic.constraints import Box, HalfSpace
from poegen.expert_servers.analytic.mixture import GaussianMixture, regional_mixture
from poegen.expert_servers.analytic.rewards import LinearReward, QuadraticReward, SigmoidReward
from poegen.expert_servers.analytic.targets import (
    BoxTarget,
    ExactTarget,
    GaussianMixtureTarget,
    ProjectedTiltTarget,
    expected_reward,
)
from poegen.expert_servers.analytic.tasks import (
    bar,
    das_grid_task,
    das_ring_task,
    grid_of_gaussians,
    ring_of_gaussians,
)

__all__ = [
    "Box",
    "BoxTarget",
    "ExactTarget",
    "GaussianMixture",
    "GaussianMixtureTarget",
    "HalfSpace",
    "LinearReward",
    "ProjectedTiltTarget",
    "QuadraticReward",
    "SigmoidReward",
    "bar",
    "das_grid_task",
    "das_ring_task",
    "exact_target",
    "expected_reward",
    "grid_of_gaussians",
    "product",
    "regional_mixture",
    "ring_of_gaussians",
    "tilt",
    "truncate",
]
