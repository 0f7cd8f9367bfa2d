"""Flow experts on diffusers: FLUX, SD3, Wan, and any flow-velocity diffusers model.

Adapters (entry points of the group ``poegen.backends``: ``flux``, ``flux_fill``, ``sd3``,
``wan``, ``flow``; each a :class:`~poegen.expert_servers.server.adapter.ModelAdapter` with a
zero-argument constructor)::

    poegen serve flux --model-root /models --model FLUX.1-dev --option guidance_scale=3.5

* :class:`FluxAdapter` (``flux``): FLUX.1 text-to-image and FLUX depth/canny control;
* :class:`FluxFillAdapter` (``flux_fill``): FLUX.1 Fill (inpainting an image under a mask);
* :class:`SD3Adapter` (``sd3``): Stable Diffusion 3 / 3.5;
* :class:`WanAdapter` (``wan``): Wan 2.1 text-to-video and image-to-video;
* :class:`FlowAdapter` (``flow``): any diffusers model predicting a flow velocity (a
  UNet2DModel trained with flow matching), in pixel space or a folder's VAE space.

Each loads the folder with diffusers' ``from_pretrained`` and drives the components one call at
a time (never a pipeline's ``__call__``); the served expert is generative, answers
``Prepare`` (prompts encoded once), ``Velocity``, ``Encode``/``Decode`` and ``Schedule``. The
conventions (rectified flow, t = σ·1000, latents unpacked, pixels in [-1, 1]) and each
family's conditions are in the modules' docstrings and ``docs/flow.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each family imports its diffusers pipeline module (and with it transformers' text encoders),
# which costs seconds: names load their module on first use, so `poegen serve flow` imports
# only the generic adapter.
_MODULES = {
    "FamilyExpert": "family",
    "LatentLayout": "family",
    "FluxAdapter": "flux",
    "FluxExpert": "flux",
    "FluxFillAdapter": "fill",
    "FluxFillExpert": "fill",
    "FlowAdapter": "generic",
    "FlowModelExpert": "generic",
    "SD3Adapter": "sd3",
    "SD3Expert": "sd3",
    "WanAdapter": "wan",
    "WanExpert": "wan",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
