"""ComfyUI values ↔ poegen specs and results. Nothing here imports ComfyUI.

ComfyUI's tensors (channels last, values in [0, 1]):

* IMAGE ``(B, H, W, C)`` float32; MASK ``(B, H, W)`` or ``(H, W)``; LATENT ``{"samples": (B, …)}``.

poegen's (channels first): pixels ``(C, H, W)`` in [-1, 1]; a region is a mask over the sample
in [0, 1]. The conversions:

* condition image: the batch's first image, ``(H, W, C)`` → ``(C, H, W)``, x ↦ 2x − 1 (the
  range of :class:`poegen.clients.spec.TensorFile` images); mode ``"L"`` keeps one channel
  (a gray image's value exactly, else the ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B);
* region mask: the batch's first mask as an 8-bit grayscale PNG, which the spec resizes
  (bilinear) to the sample's last two dimensions: a mask is exact to 1/255;
* results: the decoded samples (highest weight first) as IMAGE ``(K, H, W, 3)``, ``u8 / 255``,
  so ComfyUI's SaveImage writes back the SDK's pixels exactly (``255 · (u / 255)`` truncates
  to ``u`` in float32 for every u in 0…255); a video's frames of its best sample as IMAGE
  ``(F, H, W, 3)``; LATENT ``{"samples": particles[image_indices]}`` (the same particles).

Errors: a field of the spec (``experts[1].condition.text``, ``settings.num_particles``) names
the node and input it came from (:func:`node_error`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poegen.clients.spec import GenerationSpec, SpecBuilder

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


@dataclass(frozen=True, slots=True)
class ExpertEntry:
    """One factor as a PoE Expert node gave it (the EXPERT socket carries a tuple of them).

    Attributes:
        node_id: the PoE Expert node (errors name it).
        endpoint: ``host:port`` of an ExpertService, or an endpoint name of the stack.
        weight: exponent, reward scale or constraint scale.
        text: condition text.
        box: region, [start, stop) per trailing sample dimension.
        mask: region mask ``(H, W)`` in [0, 1].
        image: condition tensor ``(C, H, W)`` in [-1, 1], named ``image_name``.
    """

    node_id: str
    endpoint: str
    weight: float = 1.0
    text: str = ""
    box: tuple[tuple[int, int], ...] | None = None
    mask: Tensor | None = None
    image: Tensor | None = None
    image_name: str = "image"


@dataclass(frozen=True, slots=True)
class StackHandle:
    """What a PoE Stack node gives: the Sampler's address and the experts' by name."""

    sampler: str
    experts: Mapping[str, str]


class NodeError(ValueError):
    """A problem of one node's input; the message names the node, the input and the field."""


# --------------------------------------------------------------------------- node inputs


def parse_box(text: str) -> tuple[tuple[int, int], ...] | None:
    """``"[[0, 16], [0, 8]]"`` → ((0, 16), (0, 8)); blank → None; ValueError otherwise."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}); expected [[start, stop], ...]") from None
    if not (
        isinstance(value, list)
        and value
        and all(
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            for pair in value
        )
    ):
        raise ValueError("expected [[start, stop], ...]: integer pairs, one per trailing dimension")
    for start, stop in value:
        if not 0 <= start < stop:
            raise ValueError(f"needs 0 <= start < stop, got [{start}, {stop}]")
    return tuple((start, stop) for start, stop in value)


def parse_shape(text: str) -> tuple[int, ...] | None:
    """``"1, 16, 16"`` → (1, 16, 16); blank → None; ValueError otherwise."""
    if not text.strip():
        return None
    parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_settings(text: str) -> dict[str, Any]:
    """The extra sampler settings: a JSON object (blank: none); ValueError otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'not JSON ({e.msg}); expected an object like {{"step_size": 0.2}}'
        ) from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object of SamplerSettings fields")
    return value


_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*=\s*(\S+)$")


def parse_endpoints(text: str) -> StackHandle:
    """``name = host:port`` lines (``sampler = …`` the Sampler; ``#`` comments), as
    :func:`format_endpoints` writes them; ValueError naming the line."""
    sampler = None
    experts: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None or ":" not in match.group(2):
            raise ValueError(f"line {number}: expected 'name = host:port', got {raw.strip()!r}")
        name, address = match.groups()
        if name == "sampler":
            sampler = address
        elif name in experts:
            raise ValueError(f"line {number}: {name!r} is given twice")
        else:
            experts[name] = address
    if sampler is None:
        raise ValueError("no 'sampler = host:port' line")
    return StackHandle(sampler, experts)


def format_endpoints(stack: StackHandle) -> str:
    """The lines :func:`parse_endpoints` reads."""
    lines = [f"sampler = {stack.sampler}"]
    lines += [f"{name} = {address}" for name, address in stack.experts.items()]
    return "\n".join(lines)


def image_condition(image: Tensor, mode: str) -> Tensor:
    """A ComfyUI IMAGE's first picture as a condition tensor ``(C, H, W)`` in [-1, 1]."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE (B, H, W, C), got shape {list(image.shape)}")
    pixels = image[0, ..., :3].float().cpu()
    if mode == "L" and pixels.shape[-1] == 3:
        gray = bool((pixels == pixels[..., :1]).all())
        luma = pixels[..., :1] if gray else (pixels * torch.tensor(LUMA)).sum(-1, keepdim=True)
        pixels = luma
    elif mode != "L" and pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    return (2 * pixels - 1).permute(2, 0, 1).contiguous()


def save_mask_png(mask: Tensor, path: Path) -> Path:
    """A ComfyUI MASK's first mask as an 8-bit grayscale PNG (see the module docstring)."""
    from PIL import Image

    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected a MASK (B, H, W) or (H, W), got shape {list(mask.shape)}")
    values = (mask.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(values, mode="L").save(path)
    return path


# --------------------------------------------------------------------------- the spec


def build_spec(
    experts: Sequence[ExpertEntry],
    *,
    seed: int,
    particles: int,
    levels: int,
    mcmc_steps: int,
    preset: str,
    sample_shape: Sequence[int] | None,
    samples: int,
    previews: bool,
    settings: Mapping[str, Any],
    files: Path,
) -> GenerationSpec:
    """The spec of a PoE Sampler node; masks and images are written under ``files``, which
    must outlive the job's request (it is read when the request is built)."""
    from safetensors.torch import save_file

    builder = SpecBuilder(seed=seed, sample_shape=sample_shape)
    for i, entry in enumerate(experts):
        tensors: dict[str, Any] = {}
        if entry.image is not None:
            path = files / f"expert{i}_{entry.image_name}.safetensors"
            save_file({entry.image_name: entry.image.contiguous()}, str(path))
            tensors[entry.image_name] = {"file": str(path)}
        region: dict[str, Any] | None = None
        if entry.box is not None:
            region = {"box": [list(pair) for pair in entry.box]}
        elif entry.mask is not None:
            region = {"mask": str(save_mask_png(entry.mask, files / f"expert{i}_mask.png"))}
        where = (
            {"address": entry.endpoint} if ":" in entry.endpoint else {"endpoint": entry.endpoint}
        )
        builder.expert(
            **where, weight=entry.weight, text=entry.text, tensors=tensors, region=region
        )
    builder.settings(
        **settings, preset=preset, num_particles=particles, num_steps=levels, mcmc_steps=mcmc_steps
    )
    return builder.output(samples=samples).preview(previews).build()


# --------------------------------------------------------------------------- errors

# spec field (after experts[i]. / settings.) → the node input it came from
EXPERT_INPUTS = {
    "address": "endpoint",
    "endpoint": "endpoint",
    "weight": "weight",
    "condition.text": "text",
    "condition.tensors": "image",
    "region.box": "box",
    "region.mask": "mask",
    "region": "box",
}
SAMPLER_INPUTS = {
    "seed": "seed",
    "settings.num_particles": "particles",
    "settings.num_steps": "levels",
    "settings.mcmc_steps": "mcmc_steps",
    "settings.preset": "preset",
    "sample_shape": "sample_shape",
    "output.samples": "samples",
}
_EXPERT_FIELD = re.compile(r"^experts\[(\d+)\](?:\.(.*))?$")


def node_input(field: str, experts: Sequence[ExpertEntry], sampler_id: str) -> tuple[str, str]:
    """(node id, input name) of a spec field: ``experts[1].condition.text`` → the second
    expert's node and ``text``; a sampler setting → the PoE Sampler and its input; anything
    else → the PoE Sampler and no input ("")."""
    match = _EXPERT_FIELD.match(field)
    if match is not None and int(match.group(1)) < len(experts):
        rest = match.group(2) or ""
        for prefix, name in EXPERT_INPUTS.items():
            if rest == prefix or rest.startswith((f"{prefix}.", f"{prefix}[")):
                return experts[int(match.group(1))].node_id, name
        return experts[int(match.group(1))].node_id, "endpoint"
    for prefix, name in SAMPLER_INPUTS.items():
        if field == prefix or field.startswith(f"{prefix}."):
            return sampler_id, name
    return sampler_id, "settings" if field.startswith("settings") else ""


def node_error(error: Exception, experts: Sequence[ExpertEntry], sampler_id: str) -> NodeError:
    """A :class:`NodeError` naming node, input and spec field of an SDK error
    (:class:`~poegen.clients.errors.GenerationError` from the Sampler, or
    :class:`~poegen.clients.files.SpecError` from building the spec)."""
    from poegen.clients.errors import GenerationError
    from poegen.clients.files import SpecError

    if isinstance(error, GenerationError):
        problems = [(error.spec_field, f"{error.code.name}: {error.reason}")]
    elif isinstance(error, SpecError):
        problems = list(error.problems)
    else:
        return NodeError(str(error))
    parts = []
    for field, message in problems:
        node, name = node_input(field, experts, sampler_id)
        where = f"node {node} input '{name}'" if name else f"node {node}"
        parts.append(f"{where} ({field or 'spec'}): {message}")
    return NodeError("; ".join(parts))


# --------------------------------------------------------------------------- results


def comfy_images(result: Any) -> Tensor:
    """IMAGE of a result: its decoded images ``(K, H, W, 3)``, or its best video's frames."""
    if result.images:
        frames = np.stack([np.asarray(image.convert("RGB")) for image in result.images])
    elif result.video is not None:
        frames = np.asarray(result.video[0])
    else:
        raise NodeError(
            f"the samples (shape {list(result.sample_shape)}) are not pixels and no expert "
            "decodes them (an AUTOENCODER): there is no IMAGE to give"
        )
    return torch.from_numpy(frames.astype(np.float32) / 255.0)


def comfy_latent(result: Any) -> dict[str, Tensor]:
    """LATENT of a result: the particles the images show, in their order."""
    indices = list(result.image_indices) or list(range(result.particles.shape[0]))
    return {"samples": result.particles[indices].float().contiguous()}


def preview_image(preview: Tensor | None) -> Any:
    """A PIL preview of a level's clean estimate when it is pixels, else None."""
    from poegen.clients.outputs import is_pixel_shape, to_uint8

    if preview is None or not is_pixel_shape(tuple(preview.shape)) or preview.ndim != 3:
        return None
    from PIL import Image

    return Image.fromarray(to_uint8(preview))


def summary(result: Any) -> str:
    """One line about a finished job (the PoE Sampler shows it)."""
    log_z = result.log_evidence
    z = f"{log_z:.3g}" if math.isfinite(log_z) else str(log_z)
    return (
        f"{result.particles.shape[0]} particles, {len(result.trace)} levels, "
        f"ESS {result.ess:.1f}, log Z {z}, {result.seconds:.1f} s"
    )
