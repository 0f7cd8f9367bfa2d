"""One run's problem: the factors validated against each other and the settings, split by kind.

:func:`build_problem` binds each :class:`~poegen.kernel.spec.Factor` to its expert's
description, checks names, latent spaces, regions, weights and what the chosen kernel and
transition need (``ValueError``/``TypeError`` naming the field), and returns a frozen
:class:`Problem`: the generative factors with their masks w_i·m_i and the per-coordinate total
B = Σ_i w_i·m_i, the potentials (discriminative and constraint), the proposers, the scored
constraints ("ties") and how pixel-input potentials see x̂_0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poegen.kernel.calls import BoundFactor
from poegen.kernel.coupling import Coupling
from poegen.kernel.crop import CroppedExpert, check_window, window_mask, window_shape
from poegen.kernel.experts import Capability, ExpertKind, KernelError, check_expert
from poegen.kernel.schedule import checked_grid, sigmas_for
from poegen.kernel.spec import FK_PARTICLES_PER_COORDINATE, Factor, SamplerSettings


@dataclass(frozen=True, slots=True)
class Problem:
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
    couplings: tuple[Coupling, ...] = ()  # conditional experts (``poegen.kernel.coupling``)


@dataclass(frozen=True, slots=True)
class PixelSource:
    """Where pixel-input potentials get their pixels: the decoder of the generative experts'
    latent space (an expert with ``AUTOENCODER``), or ``None`` for pixel-space experts."""

    decoder: BoundFactor | None


def check_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if not shape or any(s <= 0 for s in shape):
        raise KernelError("sample_shape", f"needs positive dimensions, got {tuple(sample_shape)}")
    return shape


def resolve_transition(
    settings: SamplerSettings, problem: Problem, shape: tuple[int, ...]
) -> SamplerSettings:
    """The settings with ``transition="auto"`` made "fk" or "euler" (``poegen.kernel.spec``):
    FK for a product (several generative factors, or exponents ≠ 1) with
    N ≥ ``FK_PARTICLES_PER_COORDINATE``·d and every scored constraint giving ``log_prob``."""
    if settings.transition != "auto":
        return settings
    product = len(problem.generative) > 1 or bool((problem.total_weight != 1).any())
    coordinates = math.prod(shape)
    enough = settings.num_particles >= FK_PARTICLES_PER_COORDINATE * coordinates
    weighable = all(b.info.supports(Capability.LOG_PROB) for b in problem.ties)
    chosen = "fk" if product and enough and weighable else "euler"
    return settings.model_copy(update={"transition": chosen})


def noise_grid(settings: SamplerSettings, problem: Problem, shape: tuple[int, ...]) -> Tensor:
    """The settings' grid, or with ``schedule="expert"`` the first generative expert's own."""
    if settings.sigmas is not None or settings.schedule != "expert":
        return sigmas_for(settings)
    for b in problem.generative:
        if b.info.supports(Capability.SCHEDULE):
            levels = b.factor.expert.schedule(settings.num_steps, shape)  # type: ignore[attr-defined]
            return checked_grid(levels, settings.num_steps, f"expert {b.name!r}")
    raise KernelError("schedule", "'expert' needs a generative expert that answers schedule()")


def build_problem(
    factors: Sequence[Factor],
    shape: tuple[int, ...],
    settings: SamplerSettings,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Problem:
    """Validate the factors against each other and the settings; split them by kind."""
    bound = [_bind(i, f, shape) for i, f in enumerate(factors)]
    names = [b.name for b in bound]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise KernelError("factors", f"duplicate factor names {dup}; give each a distinct name=")
    generative = tuple(b for b in bound if b.info.kind == ExpertKind.GENERATIVE)
    if not generative:
        raise KernelError("factors", "at least one generative expert is needed")
    spaces = {b.info.latent_space for b in generative if b.info.latent_space}
    if len(spaces) > 1:
        raise KernelError(
            "factors", f"generative experts must share one latent space, got {sorted(spaces)}"
        )
    supports = [_support(b, shape, dtype, device) for b in generative]
    masks = tuple(b.factor.weight * m for b, m in zip(generative, supports, strict=True))
    total = torch.stack(masks).sum(0)
    if (total <= 0).any():
        raise KernelError(
            "factors",
            "every coordinate needs a positive total generative weight Σ w_i·m_i; "
            f"{int((total <= 0).sum())} coordinates have none (check regions and weights)",
        )
    needs_log_prob = settings.mcmc in ("mala", "hmc") and settings.mcmc_steps > 0
    for b in generative:
        if needs_log_prob and not b.info.supports(Capability.LOG_PROB):
            raise KernelError(
                "mcmc",
                f"{settings.mcmc!r} needs log_prob from every generative expert; "
                f"{b.name!r} gives none (use 'ula' or 'uhmc')",
            )
        if needs_log_prob and b.factor.region is not None:
            raise KernelError(
                "mcmc", f"{settings.mcmc!r} cannot use the regional expert {b.name!r}"
            )
    for b in bound:
        if b.info.kind == ExpertKind.CONSTRAINT and b.factor.weight <= 0:
            raise KernelError("weight", f"constraint {b.name!r} needs a positive weight")
    ties = tuple(
        b
        for b in bound
        if b.info.kind == ExpertKind.CONSTRAINT and b.info.supports(Capability.SCORE)
    )
    for b in ties:
        if settings.transition == "fk" and not b.info.supports(Capability.LOG_PROB):
            raise KernelError(
                "transition",
                f"'fk' weighs the scored constraint {b.name!r} by its log_prob, "
                "which it does not give (use transition='euler')",
            )
        if needs_log_prob and not b.info.supports(Capability.LOG_PROB):
            raise KernelError(
                "mcmc",
                f"{settings.mcmc!r} needs log_prob from the scored constraint {b.name!r}, "
                "which gives none (use 'ula' or 'uhmc')",
            )
    potentials = tuple(b for b in bound if b.info.kind != ExpertKind.GENERATIVE and b not in ties)
    proposers = tuple(
        b
        for b in bound
        if b.info.kind != ExpertKind.GENERATIVE
        and (b.info.supports(Capability.PROPOSE) or b.info.supports(Capability.PROJECT))
    )
    pixels = _pixel_source(generative, potentials, shape)
    for b in potentials:
        if (
            pixels is not None
            and pixels.decoder is not None
            and b.info.pixel_input
            and b.factor.crop
        ):
            raise KernelError(
                "crop",
                f"pixel-input expert {b.name!r} has a crop in sample coordinates, but the "
                "samples are latents decoded to pixels of another size",
            )
    needs_score = settings.mcmc_steps > 0  # the FK step forms its own score from V
    couplings = _couplings(bound, generative, supports, settings)
    return Problem(
        generative, potentials, proposers, ties, masks, total, needs_log_prob, needs_score, pixels,
        couplings,
    )  # fmt: skip


def _couplings(
    bound: Sequence[BoundFactor],
    generative: tuple[BoundFactor, ...],
    supports: Sequence[Tensor],
    settings: SamplerSettings,
) -> tuple[Coupling, ...]:
    """The conditional experts of ``Factor.parents``, checked: each parent another generative
    factor, overlapping the child somewhere; the child's expert answers ``velocity_vjp``; no
    MH kernel (the coupled velocity has no log-density)."""
    index = {b.name: i for i, b in enumerate(generative)}
    couplings = []
    for at, b in enumerate(bound):
        if not b.factor.parents:
            continue
        where = f"factors[{at}].parents"
        if b.info.kind != ExpertKind.GENERATIVE:
            raise KernelError(where, f"only generative experts take parents; {b.name!r} is not")
        if not b.info.supports(Capability.VJP):
            raise KernelError(
                where,
                f"a conditional expert needs velocity_vjp; {b.name!r} does not announce 'vjp'",
            )
        if settings.mcmc in ("mala", "hmc") and settings.mcmc_steps > 0:
            raise KernelError(
                "mcmc",
                f"{settings.mcmc!r} needs log-densities, which the coupled velocity of "
                f"{b.name!r} has none of (use 'ula' or 'uhmc')",
            )
        child = index[b.name]
        parents, weights, overlaps = [], [], []
        for name, pull in b.factor.parents.items():
            if name == b.name:
                raise KernelError(f"{where}[{name}]", "a factor cannot be its own parent")
            if name not in index:
                raise KernelError(
                    f"{where}[{name}]", f"no generative factor named {name!r} (known: "
                    f"{', '.join(sorted(index))})",
                )  # fmt: skip
            overlap = supports[child] * supports[index[name]]
            if not bool((overlap > 0).any()):
                raise KernelError(
                    f"{where}[{name}]", f"{b.name!r} and {name!r} share no coordinate to couple"
                )
            parents.append(index[name])
            weights.append(float(pull))
            overlaps.append(overlap)
        couplings.append(Coupling(child, tuple(parents), tuple(weights), tuple(overlaps)))
    return tuple(couplings)


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
        raise KernelError(
            "factors",
            f"pixel-input expert {readers[0]!r} needs one latent space to decode, but "
            f"the generative experts have {spaces}",
        )
    for b in generative:
        if b.info.supports(Capability.AUTOENCODER):
            return PixelSource(b)
    if spaces[0] and not spaces[0].startswith("pixels"):
        raise KernelError(
            "factors",
            f"pixel-input expert {readers[0]!r} needs pixels, but no generative expert "
            f"of latent space {spaces[0]!r} has an autoencoder to decode x̂_0",
        )
    if len(shape) not in (3, 4):
        raise KernelError(
            "factors",
            f"pixel-input expert {readers[0]!r} needs pixels, but the samples {shape} "
            "are neither (C, H, W) nor (C, F, H, W) and no generative expert decodes them",
        )
    return PixelSource(None)


def _bind(index: int, factor: Factor, shape: tuple[int, ...]) -> BoundFactor:
    """The factor with its expert's info; a cropped factor's expert wrapped to see its window
    (the factor keeps the crop, which its mask reads)."""
    if not isinstance(factor, Factor):
        raise TypeError(f"factors[{index}]: expected Factor, got {type(factor).__name__}")
    info = check_expert(factor.expert)
    seen = shape
    if factor.crop is not None:
        window = check_window(factor.crop, shape, f"factors[{index}].crop")
        seen = window_shape(window, shape)
        factor = dataclasses.replace(
            factor, expert=CroppedExpert(factor.expert, window, shape), crop=window
        )
        info = factor.expert.describe()
    if info.sample_shape is not None and tuple(info.sample_shape) != seen:
        raise KernelError(
            "sample_shape", f"{seen} does not match expert {info.name!r}'s {info.sample_shape}"
        )
    if factor.region is not None and info.kind != ExpertKind.GENERATIVE:
        raise KernelError(f"factors[{index}].region", "only generative experts take a region")
    return BoundFactor(factor, info, factor.name or info.name)


def _support(b: BoundFactor, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """m_i over the sample shape: the region (1 without one) times the crop's window."""
    region = b.factor.region
    window = None
    if b.factor.crop is not None:
        window = window_mask(b.factor.crop, shape, dtype=dtype, device=device)
    if region is None:
        mask = torch.ones(shape, dtype=dtype, device=device)
        return mask if window is None else mask * window
    region = torch.as_tensor(region, dtype=dtype, device=device)
    if tuple(region.shape) != shape:
        raise KernelError(
            "region", f"factor {b.name!r} has shape {tuple(region.shape)}, not {shape}"
        )
    if not torch.isfinite(region).all() or (region < 0).any() or (region > 1).any():
        raise KernelError("region", f"factor {b.name!r} needs values in [0, 1]")
    return region if window is None else region * window
