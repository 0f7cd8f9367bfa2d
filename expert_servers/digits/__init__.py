"""Trained digit experts shipped with poegen: three flow priors and two classifiers.

The models are small and trained by this repository on scikit-learn's ``load_digits``
(8×8 digits upsampled to 16×16, see :mod:`.data`) with :mod:`.train`; their weights ship in
``weights/`` as safetensors folders that load with ``from_pretrained``:

========================  =====================================  ============================
folder                    model                                  served by
========================  =====================================  ============================
``flow-all``              ``UNet2DModel``, flow velocity, all    ``poegen serve flow``
``flow-0to4``             the same on digits 0–4                 ``poegen serve flow``
``flow-even``             the same on 0, 2, 4, 6, 8              ``poegen serve flow``
``classifier-reward``     ``ResNetForImageClassification``       ``poegen serve classifier``
``classifier-judge``      ``RegNetForImageClassification``       the benchmark only
========================  =====================================  ============================

``weights/training.json`` records the training settings, the held-out test indices of
``load_digits`` (used for completions and judging, never for training), losses, test
accuracies, sizes and seconds. Flow priors follow the rectified-flow convention of
:mod:`poegen.expert_servers.flow` (x_σ = (1−σ)·x0 + σ·ε, v = ε − x0, t = 1000·σ, pixels in
[-1, 1]); classifiers read pixels in [0, 1] (their processor maps them to [-1, 1]).

    from poegen.expert_servers.digits import model_path
    UNet2DModel.from_pretrained(model_path("flow-all"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_NAMES = (
    "flow-all",
    "flow-0to4",
    "flow-even",
    "flow-cond",
    "classifier-reward",
    "classifier-judge",
)


def weights_dir() -> Path:
    """The folder of the shipped model folders (the model root to serve them from)."""
    return Path(__file__).resolve().parent / "weights"


def model_path(name: str) -> Path:
    """The shipped folder of model ``name`` (one of :data:`MODEL_NAMES`)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: unknown digits model {name!r} (known: {', '.join(MODEL_NAMES)})")
    return weights_dir() / name


def training_record() -> dict[str, Any]:
    """The shipped ``training.json``: settings, test indices, losses, accuracies, sizes."""
    return json.loads((weights_dir() / "training.json").read_text())


def held_out_indices() -> list[int]:
    """Indices of ``load_digits`` held out from every shipped model."""
    return list(training_record()["data"]["test_indices"])


__all__ = ["MODEL_NAMES", "held_out_indices", "model_path", "training_record", "weights_dir"]
