"""``FlowAdapter``: any diffusers model that predicts a flow velocity, as a generative expert.

A folder holds one diffusers model (``config.json`` whose ``_class_name`` is a diffusers
``ModelMixin``, e.g. ``UNet2DModel``, with its safetensors weights), either at its top level or
under ``transformer/`` or ``unet/``; optionally ``vae/`` (then the expert works in that VAE's
latent space, else on pixels in [-1, 1]) and ``scheduler/`` (a
``FlowMatchEulerDiscreteScheduler``: the grid ``Schedule`` returns; without one, the
scheduler's defaults)::

    digits/config.json                   {"_class_name": "UNet2DModel", "in_channels": 1, ...}
    digits/diffusion_pytorch_model.safetensors

The model was trained on the rectified-flow path (``poegen.kernel.path``): x_σ = (1−σ)·x_0 +
σ·ε, output v ≈ ε − x_0, with timestep input t = σ·``timestep_scale`` (option, default 1000,
diffusers' ``num_train_timesteps``). ``velocity(x, σ) = model(x, t)`` for x of shape
``(B, C, H, W)`` (``(B, C, F, H, W)`` for a 3-D model), C the model's ``in_channels``.

Conditions: the empty condition (unconditional), or, for a class-conditional model (config
``num_class_embeds``), the scalar ``class_label`` (an integer in [0, num_class_embeds)).

Options: the common ones (``poegen.expert_servers.flow.common``) and ``timestep_scale``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ModelMixin
from torch import Tensor

from poegen.expert_servers.flow.common import (
    LoadOptions,
    check_batch,
    check_keys,
    check_pixels,
    check_steps,
    condition_scalar,
    model_folder,
    model_revision,
    parse_options,
    read_json,
    scheduler_sigmas,
)
from poegen.expert_servers.flow.family import scheduler_layout
from poegen.expert_servers.server.adapter import Condition, ModelRef, Progress, ServedModel
from poegen.kernel.experts import (
    Capability,
    Expert,
    ExpertInfo,
    ExpertKind,
    LatentLayout,
    autograd_vjp,
)
from poegen.kernel.refusal import ExpertError

_MODEL_DIRS = ("", "transformer", "unet")
# pipeline class prefix → adapter, most specific first (FluxFillPipeline before Flux*)
FAMILY_ADAPTERS = {"FluxFill": "flux_fill", "Flux": "flux", "StableDiffusion3": "sd3", "Wan": "wan"}


def _model_dir(folder: Path) -> Path | None:
    for sub in _MODEL_DIRS:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    return None


def _model_class(config: Mapping[str, Any], ref: ModelRef, what: str) -> type[ModelMixin]:
    """The diffusers class a config names; anything else is refused (no remote code)."""
    name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ExpertError.invalid(
            "model_id",
            f"{ref.model_id!r}: {what} names {name or 'no class'}, not a diffusers model",
        )
    return cls


def _refuse_family_folder(folder: Path, ref: ModelRef) -> None:
    """A FLUX/SD3/Wan pipeline folder belongs to its own adapter, not this one."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    name = str(read_json(index, ref, "model_index.json").get("_class_name", ""))
    for prefix, adapter in FAMILY_ADAPTERS.items():
        if name.startswith(prefix):
            raise ExpertError.invalid(
                "model_id",
                f"{ref.model_id!r} is a {name} folder: serve it with the {adapter!r} adapter",
            )


class FlowAdapter:
    """Loads a flow-velocity diffusers model folder (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        opts = parse_options(options, extra=("timestep_scale",))
        scale = opts.number("timestep_scale", 1000.0, positive=True)
        folder = model_folder(ref)
        _refuse_family_folder(folder, ref)
        model_dir = _model_dir(folder)
        if model_dir is None:
            raise ExpertError.invalid("model_id", f"{ref.model_id!r} has no diffusers model config")
        cls = _model_class(read_json(model_dir / "config.json", ref, "config.json"), ref, "config")
        progress(0.1, f"loading {cls.__name__}")
        model = _load(cls, model_dir, ref, opts)
        vae = None
        if (folder / "vae" / "config.json").is_file():
            vae_config = read_json(folder / "vae" / "config.json", ref, "vae/config.json")
            vae_cls = _model_class(vae_config, ref, "vae/config.json")
            if not hasattr(vae_cls, "encode"):
                raise ExpertError.invalid("model_id", f"{ref.model_id!r}: vae/ is no autoencoder")
            progress(0.6, f"loading {vae_cls.__name__}")
            vae = _load(vae_cls, folder / "vae", ref, opts)
        if (folder / "scheduler" / "scheduler_config.json").is_file():
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        else:
            scheduler = FlowMatchEulerDiscreteScheduler()
        expert = FlowModelExpert(
            model, vae, scheduler, scale, model_id=ref.model_id,
            revision=model_revision(folder), latent_space=opts.latent_space,
        )  # fmt: skip
        return ServedModel(
            expert,
            latent_space=expert.describe().latent_space,
            max_batch=opts.max_batch,
            concurrent=False,  # a diffusers pipeline: one call at a time
        )


def _load(cls: type[ModelMixin], path: Path, ref: ModelRef, opts: LoadOptions) -> Any:
    try:
        model = cls.from_pretrained(path, dtype=opts.torch_dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError):
        raise ExpertError.invalid(
            "model_id", f"{ref.model_id!r}: {cls.__name__} could not be loaded"
        ) from None
    return model.to(opts.device).eval()


class FlowModelExpert:
    """A generative expert over one flow-velocity model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        vae: Any | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
        timestep_scale: float = 1000.0,
        *,
        model_id: str = "",
        revision: str = "",
        latent_space: str = "",
        name: str = "flow",
    ) -> None:
        self.model = model
        self.vae = vae
        self.scheduler_config = scheduler.config
        self.timestep_scale = timestep_scale
        config = model.config
        self.channels = int(config.in_channels)
        self.sample_ndim = 5 if "3D" in type(model).__name__ else 4
        self.num_classes = getattr(config, "num_class_embeds", None)
        self._takes_labels = "class_labels" in inspect.signature(model.forward).parameters
        space = "pixels" if vae is None else f"{type(vae).__name__.lower()}"
        shift, dynamic = scheduler_layout(self.scheduler_config)
        # a diffusers VAE halves the resolution at every down block but the last
        compression = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        layout = LatentLayout(
            channels=self.channels,
            spatial_compression=compression,
            shift=shift,
            dynamic_shift=dynamic,
        )
        self._info = ExpertInfo(
            name=name,
            kind=ExpertKind.GENERATIVE,
            capabilities=frozenset({Capability.SCHEDULE, Capability.VJP})
            | (frozenset({Capability.AUTOENCODER}) if vae is not None else frozenset()),
            model_id=model_id,
            revision=revision,
            latent_space=latent_space or f"{space}-{self.channels}",
            latent_layout=layout,
        )

    def describe(self) -> ExpertInfo:
        return self._info

    # -------------------------------------------------------------- generative

    @torch.no_grad()
    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._velocity(x, sigma, None)

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        """J_v(x_σ)ᵀ·c by autograd through the model (a conditional expert's pull)."""
        velocity = functools.partial(self._velocity, label=None)
        return autograd_vjp(velocity, x, sigma, cotangent)

    def _velocity(self, x: Tensor, sigma: Tensor, label: int | None) -> Tensor:
        check_batch(x, sigma, self.channels, self.sample_ndim)
        device, dtype = self.model.device, self.model.dtype
        t = (sigma.to(torch.float64) * self.timestep_scale).to(device, torch.float32)
        kwargs: dict[str, Any] = {"return_dict": False}
        if label is not None:
            kwargs["class_labels"] = torch.full((x.shape[0],), label, device=device)
        v = self.model(x.to(device, dtype), t, **kwargs)[0]
        return v.to(x.device, x.dtype)

    @torch.no_grad()
    def prepare(self, condition: Condition) -> Expert:
        """The empty condition, or ``scalars["class_label"]`` for a class-conditional model."""
        check_keys(condition, (), ("class_label",))
        if condition.text:
            raise ExpertError.invalid("condition.text", "this model takes no prompt")
        if "class_label" not in condition.scalars:
            return self
        label = condition_scalar(condition, "class_label", 0.0)
        field = "condition.scalars[class_label]"
        if not self.num_classes or not self._takes_labels:
            raise ExpertError.invalid(field, "this model is not class-conditional")
        if label != int(label) or not 0 <= label < self.num_classes:
            raise ExpertError.invalid(
                field, f"{label}, expected an integer in [0, {self.num_classes})"
            )
        return ClassView(self, int(label))

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        """The folder's FlowMatchEulerDiscreteScheduler grid for ``num_steps`` steps."""
        check_steps(num_steps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler_sigmas(scheduler)

    # -------------------------------------------------------------- autoencoder

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """z = (mode of the VAE posterior − shift)·scale."""
        vae = self._require_vae("pixels")
        check_pixels(pixels, "pixels", int(vae.config.in_channels), self.sample_ndim)
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(pixels.device, pixels.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [-1, 1] of z/scale + shift."""
        vae = self._require_vae("latents")
        check_pixels(latents, "latents", self.channels, self.sample_ndim)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1).to(latents.device, latents.dtype)

    def _require_vae(self, field: str) -> Any:
        if self.vae is None:
            raise ExpertError.failed_precondition(field, "this pixel-space model has no VAE")
        return self.vae


class ClassView:
    """A class-conditional view of a :class:`FlowModelExpert`."""

    def __init__(self, expert: FlowModelExpert, label: int) -> None:
        self.expert = expert
        self.label = label

    def describe(self) -> ExpertInfo:
        return self.expert.describe()

    @torch.no_grad()
    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.expert._velocity(x, sigma, self.label)

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        velocity = functools.partial(self.expert._velocity, label=self.label)
        return autograd_vjp(velocity, x, sigma, cotangent)

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        return self.expert.schedule(num_steps, sample_shape)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        return self.expert.encode(pixels)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.expert.decode(latents)
