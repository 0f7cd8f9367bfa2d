"""Tiny diffusers models for the flow-expert tests, built from configs with random weights.

The builders live in :mod:`poegen.expert_servers.flow.tiny` (re-exported here): each saves a
real model or pipeline folder with ``save_pretrained`` (weights under a fixed seed, tokenizers
trained offline), so the adapters are tested through their own ``from_pretrained`` loading code
and nothing comes from a hub.

:class:`FlowModels` (the session fixture ``flow_models`` of ``tests/conftest.py``) builds its
folders on first use, under one session temporary directory (the model root): ``unet``
(UNet2DModel 1×16×16, unconditional), ``unet_classes`` (10 classes), ``flux``, ``flux_depth``,
``flux_fill`` (:func:`build_flux_fill`), ``sd3``, ``wan``, ``wan_i2v``, ``wan_vace``.

Other helpers may call the builders directly (``build_unet(path, num_class_embeds=10)``).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from poegen.expert_servers.flow.tiny import (
    build_flux,
    build_sd3,
    build_unet,
    build_wan,
    build_wan_i2v,
    build_wan_vace,
)

__all__ = [
    "FlowModels",
    "build_flux",
    "build_flux_fill",
    "build_sd3",
    "build_unet",
    "build_wan",
    "build_wan_i2v",
    "build_wan_vace",
]


def build_flux_fill(path: Path, *, seed: int = 0) -> Path:
    """FluxFillPipeline: :func:`build_flux`'s parts, with a transformer reading latents ‖
    masked-image latents ‖ mask, 64 + 64 + 4·s² = 144 channels (s = 2, the tiny VAE's scale).

    The pipeline samples the masked image's VAE posterior, where the expert takes its mode: the
    VAE's encoder here gives every latent a log-variance of −30 (the posterior's floor, σ =
    3e-7), so both encode the same latents up to that and the pipeline can be fed the raw image
    and mask (with the pipeline's draw replaced by the mode, a 4-step run differs by 0).
    """
    import torch
    from diffusers import FluxFillPipeline, FluxPipeline

    base = build_flux(path.with_name(f"{path.name}_base"), seed=seed,
                      transformer={"in_channels": 144})  # fmt: skip
    pipe = FluxFillPipeline.from_pipe(FluxPipeline.from_pretrained(base))
    conv = pipe.vae.encoder.conv_out  # 2·16 channels: the posterior's means, then log-variances
    with torch.no_grad():
        conv.weight[16:] = 0.0
        conv.bias[16:] = -30.0
    pipe.save_pretrained(path)
    shutil.rmtree(base)
    return path


class FlowModels:
    """Tiny model folders under one root, each built once, on first use (thread-safe)."""

    BUILDERS: ClassVar[dict[str, Callable[[Path], Path]]] = {
        "unet": build_unet,
        "unet_classes": lambda p: build_unet(p, num_class_embeds=10),
        "flux": build_flux,
        "flux_depth": lambda p: build_flux(p, control=True),
        "flux_fill": build_flux_fill,
        "sd3": build_sd3,
        "wan": build_wan,
        "wan_i2v": build_wan_i2v,
        "wan_vace": build_wan_vace,
    }

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        with self._lock:
            folder = self.root / name
            if not folder.exists():
                self.BUILDERS[name](folder)
            return folder
