"""The Expert protocol and the plugin registry.

An *expert* is any object that describes itself and answers batched calls for one of three
kinds of factor in the product

    p(x) ∝ Π_i p_i(x)^{w_i} · Π_j exp(λ_j · r_j(x)) · Π_k 1[x ∈ C_k]

* **generative** (``p_i``): ``velocity(x, sigma)`` of the rectified-flow path (see
  :mod:`poegen.kernel.path`); optionally ``score(x, sigma)`` and ``log_prob(x, sigma)``, the
  log-density of its noised marginal p_σ up to a constant that may depend on σ only. MALA and
  HMC need ``log_prob`` from every generative expert. ``velocity_vjp(x, sigma, cotangent)``
  (capability ``VJP``), J_v(x)ᵀ·c per sample, lets it be a *conditional* expert pulled toward
  its parents' velocities (``Factor.parents``, :mod:`poegen.kernel.coupling`).
* **discriminative** (``r_j``): ``log_potential(x0)``, a log-potential per sample of a batch of
  clean estimates x̂_0. No gradient is required: discriminative experts enter only through
  the SMC weights.
* **constraint** (``C_k``): ``log_potential(x0)`` (0 inside, −inf outside for an indicator; any
  value ≤ 0 for a soft constraint), and optionally ``propose(x, sigma, seed)`` (a random move of
  x_σ at level σ) and ``project(x, sigma)`` (a deterministic map of x_σ at level σ).

Any kind may also answer ``encode(pixels)`` and ``decode(latents)`` (capability
``AUTOENCODER``), the VAE of its latent space; ``schedule(num_steps, sample_shape)`` (capability
``SCHEDULE``), its own noise grid of ``num_steps + 1`` levels from 1 to 0 (a flow model's
scheduler), used when ``SamplerSettings.schedule == "expert"``; and, on a prepared condition,
``render()`` (capability ``RENDER``), named tensors derived from it (a simulated scene's depth,
masks, frames) that other experts take as conditions.

A discriminative or constraint expert with ``ExpertInfo.pixel_input`` scores decoded pixels in
[0, 1], ``(B, C, H, W)`` or ``(B, C, F, H, W)``, instead of latents: the sampler decodes x̂_0
with the generative experts' autoencoder before calling it.

Shapes: ``x`` and ``x0`` are ``(B, *S)`` with ``S`` the sample shape, ``sigma`` is ``(B,)``,
log-densities and log-potentials are ``(B,)``. Experts are deterministic functions of their
inputs; an expert that needs randomness takes the ``seed`` the kernel draws from its own
generator. Optional methods are announced in ``ExpertInfo.capabilities``: the kernel never
probes for attributes.

Third-party experts register through the entry-point group ``poegen.experts``::

    [project.entry-points."poegen.experts"]
    my_expert = "my_package.module:MyExpert"

and are built by name with :func:`create_expert`. Lookups read the installed distributions
each time; nothing is cached at import.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

ENTRY_POINT_GROUP = "poegen.experts"


class KernelError(ValueError):
    """A run the kernel refuses, naming what is to blame in its own terms: ``field`` (a setting
    such as ``"mcmc"``, ``"sample_shape"``, ``"factors"``, ``"factors[2].region"``, a factor's
    ``"weight"`` or ``"region"``) and ``reason``. ``str()`` is ``"<field>: <reason>"``, and the
    Sampler service maps ``field`` to a request path without reading the message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ExpertKind(enum.StrEnum):
    """The role of an expert in the product."""

    GENERATIVE = "generative"
    DISCRIMINATIVE = "discriminative"
    CONSTRAINT = "constraint"


class Capability(enum.StrEnum):
    """Optional calls an expert answers, beyond the required one of its kind."""

    SCORE = "score"
    LOG_PROB = "log_prob"
    PROPOSE = "propose"
    PROJECT = "project"
    AUTOENCODER = "autoencoder"
    SCHEDULE = "schedule"
    RENDER = "render"
    VJP = "vjp"


CAPABILITY_METHODS = {
    Capability.SCORE: ("score",),
    Capability.LOG_PROB: ("log_prob",),
    Capability.PROPOSE: ("propose",),
    Capability.PROJECT: ("project",),
    Capability.AUTOENCODER: ("encode", "decode"),
    Capability.SCHEDULE: ("schedule",),
    Capability.RENDER: ("render",),
    Capability.VJP: ("velocity_vjp",),
}


REQUIRED_METHOD = {
    ExpertKind.GENERATIVE: "velocity",
    ExpertKind.DISCRIMINATIVE: "log_potential",
    ExpertKind.CONSTRAINT: "log_potential",
}


@dataclass(frozen=True, slots=True)
class LatentLayout:
    """How a generative expert's latents relate to pixels (mirrors ``LatentLayout``).

    Attributes:
        channels: C of the latents it takes, ``(B, C, H, W)`` or ``(B, C, F, H, W)``.
        packing: ``"2x2"`` when the model sees 2×2 patches packed into tokens (FLUX; the
            adapter packs, the wire carries unpacked latents), else ``"none"``.
        spatial_compression: pixels per latent cell along H and W.
        temporal_compression: frames per latent frame after the first (video), else 1.
        multiple: latent H and W must be multiples of this (the patch size).
        shift: the scheduler's static time shift.
        dynamic_shift: resolution-dependent shift settings (FLUX's base/max shift and sequence
            lengths); empty when the shift is static.
    """

    channels: int
    packing: str = "none"
    spatial_compression: int = 1
    temporal_compression: int = 1
    multiple: int = 1
    shift: float = 1.0
    dynamic_shift: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExpertInfo:
    """What an expert says about itself (mirrors ``DescribeResponse`` on the wire).

    Attributes:
        name: a short identifier, unique within one sampling run.
        kind: generative, discriminative or constraint.
        capabilities: optional calls it answers (``Capability`` values).
        sample_shape: the shape ``S`` of one sample it accepts, or ``None`` for any shape.
        max_batch: the largest batch one call may carry, or ``None`` for no limit.
        model_id: which model answers (a path, hub id or ``"analytic"``).
        revision: the model's revision; changes when the model is swapped.
        latent_space: name of the latent space the expert works in (e.g. ``"flux-vae-16"``);
            generative experts summed in one run must share it. Empty: unnamed.
        pixel_input: discriminative and constraint experts: ``log_potential`` takes decoded
            pixels in [0, 1] rather than latents.
        latent_layout: generative experts: how their latents relate to pixels, or ``None``.
    """

    name: str
    kind: ExpertKind
    capabilities: frozenset[Capability] = frozenset()
    sample_shape: tuple[int, ...] | None = None
    max_batch: int | None = None
    model_id: str = ""
    revision: str = ""
    latent_space: str = ""
    pixel_input: bool = False
    latent_layout: LatentLayout | None = None

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities


@runtime_checkable
class Expert(Protocol):
    """Anything with ``describe()``; the methods it must answer follow from its kind."""

    def describe(self) -> ExpertInfo: ...


class GenerativeExpert(Expert, Protocol):
    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """v(x_σ, σ) of shape ``(B, *S)``."""
        ...


class DifferentiableExpert(GenerativeExpert, Protocol):
    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        """J_v(x_σ)ᵀ·c of shape ``(B, *S)``: per sample, the gradient along x of ⟨v(x, σ), c⟩."""
        ...


class DiscriminativeExpert(Expert, Protocol):
    def log_potential(self, x0: Tensor) -> Tensor:
        """log-potential of each clean estimate, shape ``(B,)``."""
        ...


class ConstraintExpert(Expert, Protocol):
    def log_potential(self, x0: Tensor) -> Tensor:
        """0 where satisfied, −inf where violated (or a soft value ≤ 0), shape ``(B,)``."""
        ...


def autograd_vjp(
    velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor, cotangent: Tensor
) -> Tensor:
    """J_v(x)ᵀ·c by torch autograd through ``velocity`` (which must not disable gradients):
    how a generative expert with a differentiable velocity answers ``velocity_vjp``."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        v = velocity(leaf, sigma)
        (vjp,) = torch.autograd.grad(v, leaf, cotangent.to(v.dtype))
    return vjp.to(x.dtype)


def check_expert(expert: object) -> ExpertInfo:
    """Return the expert's info, or raise ``TypeError`` if it cannot serve its kind."""
    if not isinstance(expert, Expert):
        raise TypeError(f"expert: {type(expert).__name__} has no describe() method")
    info = expert.describe()
    if not isinstance(info, ExpertInfo):
        raise TypeError(f"expert: {type(expert).__name__}.describe() must return ExpertInfo")
    method = REQUIRED_METHOD[ExpertKind(info.kind)]
    if not callable(getattr(expert, method, None)):
        raise TypeError(f"expert {info.name!r}: a {info.kind} expert must implement {method}()")
    for capability in info.capabilities:
        for name in CAPABILITY_METHODS[Capability(capability)]:
            if not callable(getattr(expert, name, None)):
                raise TypeError(
                    f"expert {info.name!r}: announces {capability.value!r} but has no {name}()"
                )
    return info


def available_experts() -> Mapping[str, Callable[..., Any]]:
    """Installed expert factories by entry-point name (group ``poegen.experts``)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def create_expert(name: str, /, **config: Any) -> Expert:
    """Build a registered expert by its entry-point name, passing ``config`` as keywords."""
    found = available_experts()
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise KernelError("expert", f"unknown expert name {name!r} (known: {known})")
    factory = found[name].load()
    expert = factory(**config)
    check_expert(expert)
    return expert
