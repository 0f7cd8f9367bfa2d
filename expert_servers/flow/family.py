"""The part FLUX, SD3 and Wan experts share: a diffusers pipeline object, never called.

A family expert holds a pipeline loaded with ``Pipeline.from_pretrained(folder)`` (the real
loading code: every component, tokenizers included) and uses its components and helper methods
(``encode_prompt``, ``_pack_latents``, ``prepare_latents``, the VAE, the scheduler's config) one
call at a time. It never runs the pipeline's ``__call__``.

* ``prepare(condition)`` encodes the condition once and returns a *view* (:class:`FamilyView`)
  whose ``velocity(x, σ)`` runs the transformer; the view answers ``describe``, ``schedule``,
  ``encode``, ``decode`` like the expert.
* ``velocity`` of the expert itself is the default condition's (the empty prompt), encoded on
  first use.
* ``schedule(num_steps, sample_shape)``: the grid of the family's
  ``FlowMatchEulerDiscreteScheduler`` (a fresh copy from the folder's config per call, since
  diffusers' schedulers carry a step counter).

Describe: ``latent_space`` is ``"<family>-vae-<channels>"`` (e.g. ``flux-vae-16``,
``wan-vae-16``) and ``latent_layout`` (:class:`~poegen.kernel.experts.LatentLayout`, also on the
wire) the rest: channels, packing, spatial and temporal compression, scheduler shift.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from poegen.expert_servers.flow.common import Lazy, LoadOptions
from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.experts import (
    Capability,
    Expert,
    ExpertInfo,
    ExpertKind,
    LatentLayout,
    autograd_vjp,
)
from poegen.kernel.refusal import ExpertError

logger = logging.getLogger(__name__)


def scheduler_layout(config: Any) -> tuple[float, dict[str, float]]:
    if config.get("use_dynamic_shifting", False):
        keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        return float(config.get("shift", 1.0)), {k: float(config[k]) for k in keys if k in config}
    return float(config.get("shift", 1.0)), {}


class FamilyExpert:
    """Base of the FLUX, SD3 and Wan experts (see the module docstring)."""

    family = ""
    sample_ndim = 4

    def __init__(
        self, pipe: Any, opts: LoadOptions, *, model_id: str, revision: str, name: str = ""
    ) -> None:
        self.pipe = pipe
        self.opts = opts
        # Read once: the pipeline is placed (device or CPU offload) before it is handed over,
        # and diffusers finds both by walking every module (~5 ms per read, every step).
        self.device: torch.device = pipe._execution_device
        self.transformer_dtype: torch.dtype = pipe.transformer.dtype
        self.layout = self._layout()
        space = opts.latent_space or f"{self.family}-vae-{self.layout.channels}"
        self._info = ExpertInfo(
            name=name or self.family,
            kind=ExpertKind.GENERATIVE,
            capabilities=frozenset({Capability.AUTOENCODER, Capability.SCHEDULE, Capability.VJP}),
            model_id=model_id,
            revision=revision,
            latent_space=space,
            latent_layout=self.layout,
        )
        self._default = Lazy(lambda: self.prepare(Condition()))

    # ------------------------------------------------------------------ to override

    def _layout(self) -> LatentLayout:
        raise NotImplementedError

    def prepare(self, condition: Condition) -> Expert:
        raise NotImplementedError

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        raise NotImplementedError

    def encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def describe(self) -> ExpertInfo:
        return self._info

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The default condition's velocity (empty prompt)."""
        return self._default.get().velocity(x, sigma)

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        """The default condition's J_vᵀ·c."""
        return self._default.get().velocity_vjp(x, sigma, cotangent)

    def fresh_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A new scheduler from the folder's config (schedulers are stateful)."""
        config = self.pipe.scheduler.config
        if type(self.pipe.scheduler) is FlowMatchEulerDiscreteScheduler:
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        # e.g. Wan's UniPC folders: the flow-matching Euler grid with the folder's shift
        shift = float(config.get("flow_shift", config.get("shift", 1.0)))
        return FlowMatchEulerDiscreteScheduler(shift=shift)


def read_box(condition: Condition, multiple: int) -> tuple[int, int, int, int] | None:
    """The condition's ``box`` ``[top, left, height, width]`` in latent cells, or None."""
    box = condition.tensors.get("box")
    if box is None:
        return None
    field = "condition.tensors[box]"
    if box.shape != (4,) or not torch.isfinite(box.double()).all():
        raise ExpertError.invalid(
            field, f"shape {list(box.shape)}, expected [top, left, height, width]"
        )
    values = [float(v) for v in box.double()]
    if any(v != int(v) for v in values) or values[0] < 0 or values[1] < 0:
        raise ExpertError.invalid(field, "expected non-negative integers")
    top, left, height, width = (int(v) for v in values)
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ExpertError.invalid(
            field, f"height and width must be positive multiples of {multiple}"
        )
    return top, left, height, width


class FamilyView:
    """A prepared condition of a family expert; subclasses implement ``_velocity``.

    With a ``box`` (condition tensor ``[top, left, height, width]`` in latent cells, the same
    for every frame of a video) the model sees only that crop of x, as a whole image with this
    condition's prompt, and the velocity is zero outside it: pair it with a kernel
    ``Factor.region`` of the same box, which makes the expert speak only there.
    """

    def __init__(self, expert: FamilyExpert, box: tuple[int, int, int, int] | None = None) -> None:
        self.expert = expert
        self.box = box

    @torch.no_grad()
    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """v(x_σ, σ): the model on x, or on the box's crop of x (zero elsewhere)."""
        return self._boxed_velocity(x, sigma)

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        """J_v(x_σ)ᵀ·c by autograd through the transformer (a conditional expert's pull)."""
        return autograd_vjp(self._boxed_velocity, x, sigma, cotangent)

    def _boxed_velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.box is None:
            return self._velocity(x, sigma)
        top, left, height, width = self.box
        grid = list(x.shape[-2:])
        if x.ndim < 4 or top + height > grid[0] or left + width > grid[1]:
            raise ExpertError.invalid(
                "condition.tensors[box]",
                f"{list(self.box)} does not fit the latent grid {grid} of x",
            )
        crop = (..., slice(top, top + height), slice(left, left + width))
        v = torch.zeros_like(x)
        v[crop] = self._velocity(x[crop].contiguous(), sigma)
        return v

    def _velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> ExpertInfo:
        return self.expert.describe()

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        return self.expert.schedule(num_steps, sample_shape)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.expert.encode(pixels)

    def decode(self, latents: Tensor) -> Tensor:
        return self.expert.decode(latents)
