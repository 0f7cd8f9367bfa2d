"""Flow experts on diffusers: FLUX, SD3, Wan, and any flow-velocity diffusers model.

Adapters (entry points of the group ``poegen.backends``: ``flux``, ``sd3``, ``wan``, ``flow``;
each a :class:`~poegen.expert_servers.server.adapter.ModelAdapter` with a zero-argument
constructor)::

    poegen serve flux --model-root /models --model FLUX.1-dev --option guidance_scale=3.5

* :class:`FluxAdapter` (``flux``): FLUX.1 text-to-image and FLUX depth/canny control;
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

from poegen.expert_servers.flow.family import FamilyExpert, LatentLayout
from poegen.expert_servers.flow.flux import FluxAdapter, FluxExpert
from poegen.expert_servers.flow.generic import FlowAdapter, FlowModelExpert
from poegen.expert_servers.flow.sd3 import SD3Adapter, SD3Expert
from poegen.expert_servers.flow.wan import WanAdapter, WanExpert

__all__ = [
    "FamilyExpert",
    "FlowAdapter",
    "FlowModelExpert",
    "FluxAdapter",
    "FluxExpert",
    "LatentLayout",
    "SD3Adapter",
    "SD3Expert",
    "WanAdapter",
    "WanExpert",
]
