"""Metrics of the paper's editing recipe (``examples/paper/editing``, ``docs/paper-editing.md``).

The paper reports background MSE↓ and foreground LPIPS↓ (with GPT-4o controllability and
ImageReward). :func:`measure` reads a run's output folder (``poegen generate`` or ``edit.py``)
and the recipe's ``background.png`` and ``mask.png`` and gives, over the decoded samples
``sample_NNN.png`` (pixels in [0, 1]; the mask binarised at ½, as Fill binarises it):

* ``background_mse``, ``background_psnr``: MSE and PSNR (torchmetrics, data range 1) outside
  the mask against the background, all samples together; PSNR ``inf`` when equal;
* ``edit_background_psnr``: the same for ``edit_NNN.png`` (the SDK script's composites), when
  present: ``inf`` unless the composite lost a pixel;
* ``foreground_ssim``, ``foreground_mse``: the samples against the graphics render's RGB inside
  the mask (torchmetrics SSIM on the masked images, the outside zeroed in both; the mean over
  samples): how close the object is to what was posed. LPIPS needs network weights, which this
  project does not download, so SSIM stands in; on real checkpoints the render is a flat grey
  mesh, so only changes between runs (coupled vs not) mean something, not the level.

::

    python -m poegen.bench.paper_editing examples/paper/editing out/paper-editing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def read_image(path: Path, size: tuple[int, int] | None = None) -> Tensor:
    """``(3, H, W)`` float64 in [0, 1]."""
    image = Image.open(path).convert("RGB")
    if size is not None and image.size != size:
        raise ValueError(f"{path.name}: {image.size[0]}×{image.size[1]}, expected {size}")
    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)


def _psnr(images: list[Tensor], target: Tensor, keep: Tensor) -> float:
    preds = torch.cat([x[:, keep] for x in images], 1)
    truth = target[:, keep].repeat(1, len(images))
    if torch.equal(preds, truth):
        return math.inf
    return float(peak_signal_noise_ratio(preds, truth, data_range=1.0))


def _render_rgb(recipe: Path) -> Tensor:
    """The graphics render of the recipe's placement, ``(3, H, W)`` in [0, 1] (edit.py's)."""
    spec = importlib.util.spec_from_file_location("paper_edit", recipe / "edit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render(recipe)["rgb"][0].double()


def measure(recipe: Path, outputs: Path) -> dict[str, float]:
    """The metrics of the module docstring for the run in ``outputs`` of ``recipe``."""
    background = read_image(recipe / "background.png")
    size = (background.shape[2], background.shape[1])
    inside = torch.from_numpy(np.asarray(Image.open(recipe / "mask.png").convert("L")) >= 128)
    keep = ~inside
    samples = [read_image(p, size) for p in sorted(outputs.glob("sample_*.png"))]
    if not samples:
        raise ValueError(f"{outputs}: no sample_NNN.png")
    outside = torch.cat([x[:, keep] for x in samples], 1)
    mse = float((outside - background[:, keep].repeat(1, len(samples))).square().mean())
    out = {"background_mse": mse, "background_psnr": _psnr(samples, background, keep)}
    edits = [read_image(p, size) for p in sorted(outputs.glob("edit_*.png"))]
    if edits:
        out["edit_background_psnr"] = _psnr(edits, background, keep)
    render = _render_rgb(recipe) * inside
    fg = torch.stack([x * inside for x in samples])
    ref = render.expand_as(fg)
    # SSIM's Gaussian window (11 px) needs images at least that large; tiny runs use 7 px
    kernel = 11 if min(size) >= 11 else max(3, (min(size) // 2) * 2 - 1)
    ssim = structural_similarity_index_measure(fg, ref, data_range=1.0, kernel_size=kernel)
    out["foreground_ssim"] = float(ssim)
    out["foreground_mse"] = float((fg - ref).square().sum() / (inside.sum() * 3 * len(samples)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path, help="the recipe's folder")
    parser.add_argument("outputs", type=Path, help="a run's output folder")
    args = parser.parse_args(argv)
    figures = measure(args.recipe, args.outputs)
    print(json.dumps({k: (v if math.isfinite(v) else str(v)) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
