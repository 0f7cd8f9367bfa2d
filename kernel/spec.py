"""What to sample: the factors of the product and the sampler's settings.

``Factor`` binds an expert to its exponent (generative), reward scale λ (discriminative) or
soft-constraint scale, and an optional region mask. ``SamplerSettings`` is a validated,
serialisable pydantic model (the one place the kernel uses pydantic: it is an edge, filled from
YAML, the CLI and the wire). Every invalid value raises ``ValueError`` naming the field.

Defaults and why (figures: ``bench/accuracy.py``, results in ``bench/results/accuracy.json``):

* ``transition="auto"``: the FK transition (``"fk"``, ``poegen.kernel.transition``) where its
  weights have something to correct, a product (several generative factors, or exponents
  ≠ 1), and the particles can keep them even: N ≥ ``FK_PARTICLES_PER_COORDINATE`` (32) × the
  sample's coordinates; Euler on the averaged velocity otherwise (one expert at β = 1, where
  FK has no weight and the model's own step is the natural one; latents of thousands of
  coordinates with a few particles). The FK transition is exact in continuous time and fixes
  what Euler cannot, the masses of separated modes; its control drift (``fk_control``) keeps
  its weights from degenerating with the dimension, as they did without it. The accuracy
  suite has both per task (``poegen``: this default, ``euler``, and ``fk_transition``: FK
  without the drift); ``docs/sampler.md`` quotes it. Why 32: the drift's least-squares fit has
  2 features per coordinate, and its in-sample fit flatters the weights by about
  features/particles, so FK needs well over the 4 particles per feature the fit itself asks
  for; 16 per feature is where the suite's largest products (d = 64, 1024 particles) sit, and
  there the exploratory runs had Euler as good. A scored constraint without ``log_prob`` also
  selects Euler (FK weighs it by its log-density). Euler keeps one flow expert, one particle
  and no moves equal to a diffusers pipeline bit for bit.
* ``sde_noise=1.0``: γ of the FK step's g(σ)² = 2γσ²; γ = 0 (the weighted ODE) leaves resampled
  copies identical until a move separates them; γ = 0.25 and 1 measured alike at d = 2.
* ``mcmc="ula"``: velocity models give no log-densities, so MH correction is optional.
* ``schedule="linear"``: on the accuracy suite it beats FLUX's shifted grid at equal budget
  (T1 energy distance 4.4e-3 vs 1.2e-2 at 50 steps); flow models served at high resolution
  may prefer ``"shifted"``.
* ``step_rule="sigma2"``, ``step_size=1.0``: η_k = c·σ_k²/W_max, the Langevin step scaled like
  the noise variance at the level (R3 scales by β_t); W_max is the largest total generative
  weight on a coordinate, because the product's width shrinks like 1/√W. The intermediate
  product's variance is at least σ²/W_max, so c < 2 keeps ULA stable; c = 1 measured best on
  T1/T2 (c = 0.1: 3.4e-2, 0.5: 7.4e-3, 1.0: 4.4e-3 on T1).
* ``mcmc_rewards=True``: resample-move. Weights are taken right after the transition, then the
  particles are resampled, then the MCMC moves keep π_σ·exp(φ_k) invariant by a second
  acceptance test on the potential (one extra call of each discriminative/constraint expert per
  MCMC step). ``False`` moves on the generative product only, then weighs (cheaper with costly
  rewards, exact by telescoping, but the moves undo the reward's selection and the weights
  degenerate under strong rewards).
* ``ess_threshold=0.5``: resample when ESS/N < ½ (0 never, 1 always).
* ``resampling="systematic"``: lowest variance of the unbiased schemes for its cost.
* ``tempering="linear"``: λ_k grows linearly from 0 at σ = 1 to 1 at the last level.
* ``constraint_penalty=10``: before the last level a violated hard constraint costs
  −(k/L)·10 in log-weight instead of −inf (see ``sampler``); ``inf`` kills at every level.
* ``weighting="incremental"``: exact SMC bookkeeping (the telescoping potentials make the
  final target exact); ``"level"`` is the paper's sketch.

``SamplerSettings.paper()`` is the preset of the paper's Algorithm 1: the Euler transition,
resample at every level on the current reward level, no tempering; the result's best particle
is the paper's output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from poegen.kernel.experts import Expert, KernelError

MCMCKernel = Literal["ula", "mala", "hmc", "uhmc"]
FK_PARTICLES_PER_COORDINATE = 32  # transition="auto" takes FK from N ≥ 32·d (module docstring)
ResamplingScheme = Literal["systematic", "stratified", "residual", "multinomial", "ssp"]
Tempering = Literal["constant", "linear", "exponential", "adaptive"]


@dataclass(frozen=True, slots=True)
class Factor:
    """One factor of the product.

    Attributes:
        expert: an object implementing the Expert protocol.
        weight: exponent w_i of a generative expert, scale λ_j of a discriminative expert's
            log-potential, or scale of a soft constraint's log-potential (an indicator is
            unchanged by any positive scale).
        region: generative only: a mask of the sample shape with values in [0, 1]. The expert
            sees the whole sample (or its ``crop``); its score counts only inside the mask
            (see ``sampler``).
        name: name in traces; defaults to the expert's own name.
        crop: [start, stop) per trailing sample dimension: the expert sees only this window
            of each sample, and its factor is p(x_W) (or r(x̂_0[W])); see
            ``poegen.kernel.crop``. ``None``: the whole sample.
        parents: generative only: makes the factor a *conditional expert*, its velocity pulled
            toward each named parent's (another generative factor) with the weight given,
            ``{"depth": 0.5}``; its expert must answer ``velocity_vjp``. See
            ``poegen.kernel.coupling``. Empty: no coupling.
    """

    expert: Expert
    weight: float = 1.0
    region: Tensor | None = None
    name: str | None = None
    crop: tuple[tuple[int, int], ...] | None = None
    parents: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise KernelError("weight", f"must be finite, got {self.weight}")
        for parent, pull in self.parents.items():
            if not isinstance(parent, str) or not parent:
                raise KernelError("parents", f"names a parent by {parent!r}, expected a name")
            if not math.isfinite(pull) or pull <= 0:
                raise KernelError(f"parents[{parent}]", f"must be finite and > 0, got {pull}")


class SamplerSettings(BaseModel):
    """Settings of one sampling run (see the module docstring for the defaults)."""

    # inf and NaN are refused by the field that holds them (``gt=0`` alone lets inf through)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    num_particles: int = Field(64, ge=1, description="number of particles N")
    num_steps: int = Field(50, ge=1, description="number of noise levels (transitions)")
    mcmc_steps: int = Field(5, ge=0, description="MCMC steps per level M")
    schedule: Literal["linear", "shifted", "expert"] = Field(
        "linear", description="noise grid; 'expert': the first generative expert's own schedule"
    )
    shift: float = Field(3.0, gt=0, description="time shift of the 'shifted' grid")
    sigmas: tuple[float, ...] | None = Field(
        None, description="explicit decreasing noise grid; overrides schedule"
    )
    transition: Literal["auto", "fk", "euler"] = Field(
        "auto",
        description="level-to-level transport: Euler on v̄, the FK-corrected SDE, or 'auto' "
        "(FK for a product with enough particles per coordinate, else Euler)",
    )
    fk_control: bool = Field(
        True, description="FK transition: the control drift that keeps its weights even"
    )
    sde_noise: float = Field(
        1.0, ge=0, description="γ of the FK transition's noise g(σ)² = 2γσ (0: weighted ODE)"
    )
    mcmc: MCMCKernel = "ula"
    step_size: float = Field(1.0, gt=0, description="step-size scale c")
    step_rule: Literal["sigma2", "constant"] = "sigma2"
    adapt_step_size: bool = Field(
        False, description="MALA/HMC: adapt c level by level toward the optimal acceptance"
    )
    leapfrog_steps: int = Field(3, ge=1)
    damping: float = Field(0.5, ge=0, lt=1, description="momentum persistence of UHMC")
    ess_threshold: float = Field(0.5, ge=0, le=1)
    resampling: ResamplingScheme = "systematic"
    tempering: Tempering = "linear"
    tempering_rate: float = Field(0.008, gt=0, description="γ of the exponential schedule")
    tempering_ess: float = Field(0.5, gt=0, lt=1, description="target ESS of adaptive tempering")
    weighting: Literal["incremental", "level"] = "incremental"
    mcmc_rewards: bool = Field(
        True, description="MCMC moves see the level's reward and constraint potential"
    )
    constraint_penalty: float = Field(
        10.0,
        gt=0,  # NaN fails it; inf is allowed here only
        allow_inf_nan=True,
        description="log-weight cost of a violated hard constraint before the last level",
    )
    max_batch: int | None = Field(None, ge=1, description="largest batch per expert call")

    @field_validator("sigmas")
    @classmethod
    def _check_sigmas(cls, sigmas: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if sigmas is None:
            return None
        if len(sigmas) < 2:
            raise ValueError("needs at least two levels")
        if not all(math.isfinite(s) and 0 <= s <= 1 for s in sigmas):
            raise ValueError("every level must lie in [0, 1]")
        if any(b >= a for a, b in itertools.pairwise(sigmas)):
            raise ValueError("must be strictly decreasing")
        if sigmas[0] != 1:
            raise ValueError("must start at 1 (pure noise)")
        return tuple(float(s) for s in sigmas)

    @model_validator(mode="after")
    def _check_kernel(self) -> SamplerSettings:
        if self.sigmas is not None and len(self.sigmas) - 1 != self.num_steps:
            # an explicit grid defines the number of steps
            object.__setattr__(self, "num_steps", len(self.sigmas) - 1)
        return self

    @classmethod
    def paper(cls, **overrides: Any) -> SamplerSettings:
        """The paper's Algorithm 1: the flow's own (Euler) step, resample every level on the
        current reward level."""
        base: dict[str, Any] = dict(
            transition="euler",
            ess_threshold=1.0,
            weighting="level",
            tempering="constant",
            resampling="multinomial",
            mcmc_rewards=False,
        )
        return cls(**(base | overrides))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SamplerSettings:
        """Settings by preset name: ``"default"`` or ``"paper"``."""
        if name == "default":
            return cls(**overrides)
        if name == "paper":
            return cls.paper(**overrides)
        raise KernelError("preset", f"unknown preset {name!r} (known: default, paper)")
