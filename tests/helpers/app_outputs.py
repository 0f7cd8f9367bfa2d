"""The paper recipes' folders, copied and shrunk, and output folders as their runs write them.

For the metrics (``bench/paper_*.py``, ``bench/apps_checkpoints.py``) without rerunning the
recipes: :func:`copy_recipes` copies ``examples/paper/{editing,video,layout}`` (no models)
under ``root`` at the tests' tiny sizes (the editing photo 16×16 with its mask re-rendered,
the layout's latent grid and boxes divided by 8 as ``tests/examples/test_paper_layout.py``
does), and :func:`write_run` writes a run's folder through ``clients.outputs.write_outputs``,
the function ``poegen generate`` and the SDK scripts write with: PNGs or MP4s best first, the
contact sheet, ``particles.safetensors`` and ``trace.json``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from helpers.docs import REPO
from PIL import Image
from safetensors.torch import load_file, save_file

from poegen.clients.outputs import to_uint8, write_outputs
from poegen.clients.sdk import GenerationResult
from poegen.clients.spec import GenerationSpec

PAPER = REPO / "examples" / "paper"
EDIT_SIZE = 16  # pixels of the shrunk editing photo
LAYOUT_SCALE = 8  # the layout's 128 latent cells → 16
LAYOUT_PIXELS = 2  # pixels per latent cell of the shrunk layout's samples (the tiny VAE's)


def copy_recipes(root: Path) -> Path:
    """``root/examples/paper/<app>`` for the three apps, shrunk; ``root/examples/paper``."""
    paper = root / "examples" / "paper"
    for app in ("editing", "video", "layout"):
        shutil.copytree(
            PAPER / app, paper / app, ignore=shutil.ignore_patterns("models", "__pycache__")
        )
    editing = paper / "editing"
    with Image.open(editing / "background.png") as image:
        image.convert("RGB").resize((EDIT_SIZE, EDIT_SIZE), Image.Resampling.BOX).save(
            editing / "background.png"
        )
    loaded = importlib.util.spec_from_file_location("paper_edit_copy", editing / "edit.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    module.write_mask(editing)  # the page's own step after changing the photo
    shrink_layout_grid(paper / "layout", LAYOUT_SCALE)
    return paper


def shrink_layout_grid(layout: Path, scale: int) -> None:
    """The layout recipe's latent grid, regions and box tensors divided by ``scale`` (FLUX packs
    2×2, so every box must stay a multiple of 2)."""
    spec = yaml.safe_load((layout / "spec.yaml").read_text())
    spec["sample_shape"] = [16, *(n // scale for n in spec["sample_shape"][1:])]
    for expert in spec["experts"]:
        if "box" in expert.get("region", {}):
            assert all(v % (2 * scale) == 0 for span in expert["region"]["box"] for v in span)
            expert["region"]["box"] = [[a // scale, b // scale] for a, b in expert["region"]["box"]]
    (layout / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    boxes = load_file(layout / "boxes.safetensors")
    assert all((box % (2 * scale) == 0).all() for box in boxes.values())
    save_file({k: v // scale for k, v in boxes.items()}, layout / "boxes.safetensors")


def write_run(out: Path, spec_file: Path, pixels: torch.Tensor) -> list[Path]:
    """A run's folder for decoded ``pixels`` in [0, 1], ``(K, 3, H, W)`` images or
    ``(K, 3, F, H, W)`` videos, best first, with K particles of the spec's latent shape."""
    spec = GenerationSpec.from_file(spec_file)
    count = pixels.shape[0]
    signed = pixels * 2 - 1  # what a decoder returns: [-1, 1]
    frames = [to_uint8(p) for p in signed]  # as decode_result turns pixels into files
    log_weights = torch.log_softmax(-torch.arange(count, dtype=torch.float64), 0)
    fields = {
        "particles": torch.randn(
            count, *spec.sample_shape, generator=torch.Generator().manual_seed(0)
        ),
        "log_weights": log_weights,
        "log_evidence": 0.0,
        "best_index": 0,
        "experts": (),
        "trace": (),
        "seconds": 1.0,
        "sample_shape": tuple(spec.sample_shape),
        "pixels": signed,
        "image_indices": tuple(range(count)),
    }
    if pixels.ndim == 5:
        result = GenerationResult(**fields, video=np.stack(frames))
    else:
        result = GenerationResult(**fields, images=tuple(Image.fromarray(f) for f in frames))
    return write_outputs(result, out, spec)
