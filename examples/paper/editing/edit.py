"""The paper's editing recipe through the SDK: FLUX.1 Depth x FLUX.1 Fill on a graphics render.

Starts this folder's stack (``stack.yaml``: every expert its own ``poegen serve`` process, and
the Sampler), runs ``spec.yaml`` through it, writes what ``poegen generate`` writes, then the
edits: each decoded sample composited into the background outside the render's mask, as
diffusers' inpainting overlay does, so the background is the input photo exactly::

    python examples/paper/editing/edit.py -o out/paper-editing-sdk
    python examples/paper/editing/edit.py --write-mask     # after changing the pose or the photo

``--write-mask`` renders the spec's placement in this process (the graphics expert's own code,
on the stack's asset root) and writes ``mask.png``, the depth factor's region, which must be
the silhouette the render gives the links. See ``docs/paper-editing.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from poegen import Client, GenerationSpec, LocalStack, ProgressEvent, StackConfig, write_outputs
from poegen.clients.files import load_model_file, read_mapping, validate_model
from poegen.clients.spec import SourceSpec

RECIPE = Path(__file__).resolve().parent


def render(recipe: Path = RECIPE) -> dict[str, torch.Tensor]:
    """The render of ``spec.yaml``'s source, by the graphics expert of ``stack.yaml`` run in
    this process: ``mask`` and ``depth`` ``(1, 1, H, W)``, ``rgb`` ``(1, 3, H, W)``, in [0, 1]."""
    from poegen.expert_servers.graphics import GraphicsExpert
    from poegen.expert_servers.server.adapter import Condition

    # the source alone, not the whole spec: the spec names mask.png, which this may be writing
    (source,) = read_mapping(recipe / "spec.yaml")["sources"]
    spec = validate_model(SourceSpec, source, base_dir=recipe.resolve())
    stack = load_model_file(StackConfig, recipe / "stack.yaml")
    (graphics,) = (e for e in stack.experts if e.name == spec.endpoint)
    assert spec.condition is not None and graphics.model is not None
    condition = Condition(
        text=spec.condition.text,
        tensors={k: t.load() for k, t in spec.condition.tensors.items()},
        scalars=dict(spec.condition.scalars),
    )
    return GraphicsExpert(graphics.model).prepare(condition).render()


def write_mask(recipe: Path = RECIPE) -> Path:
    """``mask.png``: the render's silhouette, white = the object (the depth factor's region)."""
    mask = render(recipe)["mask"][0, 0]
    path = recipe / "mask.png"
    Image.fromarray((mask.numpy() * 255).round().astype(np.uint8)).save(path)  # 2-D: mode L
    return path


def composite(background: Image.Image, sample: Image.Image, mask: Image.Image) -> Image.Image:
    """``background`` where ``mask`` < ½, ``sample`` inside: the pixels Fill was asked to paint
    (it binarises the mask at ½ too); the background's pixels are copied, not re-encoded."""
    keep = np.asarray(mask.convert("L")) < 128
    out = np.where(keep[..., None], np.asarray(background.convert("RGB")), np.asarray(sample))
    return Image.fromarray(out)


def run(recipe: Path, out: Path, *, timeout_s: float = 3600) -> list[Path]:
    """Run the recipe of ``recipe`` on its own stack; write its outputs and ``edit_NNN.png``."""
    spec = GenerationSpec.from_file(recipe / "spec.yaml")
    with LocalStack.from_yaml(recipe / "stack.yaml") as stack, Client.from_stack(stack) as client:
        for event in client.stream(spec, timeout=timeout_s):  # the result comes last
            if isinstance(event, ProgressEvent):
                print(f"level {event.step + 1}/{event.total}  σ={event.sigma:.3f}", flush=True)
            else:
                result = event
    written = write_outputs(result, out, spec)
    background = Image.open(recipe / "background.png")
    mask = Image.open(recipe / "mask.png")
    for k, sample in enumerate(result.images):
        written.append(out / f"edit_{k:03d}.png")
        composite(background, sample, mask).save(written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("out/paper-editing-sdk"))
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe's folder")
    parser.add_argument("--write-mask", action="store_true", help="only write mask.png")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the job")
    args = parser.parse_args(argv)
    if args.write_mask:
        print(write_mask(args.recipe))
        return 0
    for path in run(args.recipe, args.out, timeout_s=args.timeout):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
