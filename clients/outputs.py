"""Decoding results into pictures, and writing a job's outputs to a folder.

:func:`decode_result` (the SDK calls it) turns the particles of a finished job into pixels:

* latents: ``Decode`` of the decoding expert (``output.decoder``, else the first generative
  factor whose ``Describe`` lists ``AUTOENCODER``; :meth:`RemoteExpert.decode`), which returns
  pixels in [-1, 1];
* pixel-space samples (no autoencoder, ``(C, H, W)`` or ``(C, F, H, W)`` with C = 1 or 3, or
  ``output.pixel_space: true``): the particles are the pixels in [-1, 1];
* anything else (a 2-D toy sample): no pixels.

Only the ``output.samples`` particles of highest weight are decoded (0: all).

:func:`write_outputs` writes, for a :class:`~poegen.clients.sdk.GenerationResult`::

    DIR/sample_000.png …      one PNG per decoded image, highest weight first
    DIR/sample_000.mp4 …      one MP4 per decoded video (imageio + imageio-ffmpeg)
    DIR/contact_sheet.png     the decoded samples in a grid, each labelled with its weight
    DIR/particles.png         2-D samples: a scatter plot, dot area ∝ weight
    DIR/particles.safetensors particles (N, *S) and log_weights (N,)
    DIR/trace.json            the spec, per-level events, weights, log Z, revisions
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from poegen.clients.endpoints import ClientTLS

logger = logging.getLogger(__name__)


def top_indices(log_weights: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest weights (0: all), largest first; ties by index."""
    order = torch.argsort(-log_weights.to(torch.float64), stable=True)
    return order[: count or None].tolist()


def is_pixel_shape(shape: Sequence[int]) -> bool:
    """``(C, H, W)`` or ``(C, F, H, W)`` with C = 1 or 3 and H, W ≥ 8."""
    return len(shape) in (3, 4) and shape[0] in (1, 3) and min(shape[-2:]) >= 8


def to_uint8(pixels: Tensor) -> np.ndarray:
    """[-1, 1] → uint8 [0, 255], channels last: ``(C, H, W)`` → ``(H, W, C)``,
    ``(C, F, H, W)`` → ``(F, H, W, C)`` (grayscale repeated to RGB)."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, *x.shape[1:])
    dims = (1, 2, 0) if x.ndim == 3 else (1, 2, 3, 0)
    return x.permute(*dims).contiguous().numpy()


def decode_result(
    result: Any,
    spec: Any,
    addresses: Sequence[str],
    *,
    token: str | None = None,
    tls: ClientTLS | None = None,
) -> Any:
    """``result`` with ``pixels``, ``image_indices`` and ``images`` or ``video`` filled in."""
    indices = top_indices(result.log_weights, spec.output.samples)
    chosen = result.particles[indices]
    pixels = None
    decoder = _decoder_address(spec, addresses, token, tls)
    if decoder is not None:
        from poegen.kernel.remote import RemoteExpert

        credentials = tls.credentials() if tls is not None else None
        with RemoteExpert.connect(decoder, token=token, tls=credentials) as expert:
            pixels = expert.decode(chosen.float()).float()
    elif spec.output.pixel_space or (
        spec.output.pixel_space is None and is_pixel_shape(result.sample_shape)
    ):
        pixels = chosen.float()
    if pixels is None:
        return result
    frames = [to_uint8(p) for p in pixels]
    if pixels.ndim == 5:
        return dataclasses.replace(
            result, pixels=pixels, image_indices=tuple(indices), video=np.stack(frames)
        )
    from PIL import Image

    images = tuple(Image.fromarray(f) for f in frames)
    return dataclasses.replace(result, pixels=pixels, image_indices=tuple(indices), images=images)


def _decoder_address(
    spec: Any, addresses: Sequence[str], token: str | None, tls: ClientTLS | None
) -> str | None:
    from poegen.clients.endpoints import describe

    for i, expert in enumerate(spec.experts):
        if spec.output.decoder is not None and expert.label != spec.output.decoder:
            continue
        info = describe(addresses[i], token=token, tls=tls)
        if "autoencoder" in info.capabilities and (
            spec.output.decoder is not None or info.kind == "generative"
        ):
            return addresses[i]
        if spec.output.decoder is not None:
            raise ValueError(f"output.decoder: {spec.output.decoder!r} has no AUTOENCODER")
    if spec.output.decoder is not None:
        raise ValueError(f"output.decoder: no expert named {spec.output.decoder!r}")
    return None


# --------------------------------------------------------------------------- files


def contact_sheet(
    images: Sequence[Any], labels: Sequence[str], *, columns: int | None = None
) -> Any:
    """A grid of ``images`` (PIL), each with its label underneath."""
    from PIL import Image, ImageDraw, ImageFont

    columns = columns or min(len(images), max(1, math.ceil(math.sqrt(len(images)))))
    rows = math.ceil(len(images) / columns)
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    scale = max(1, 96 // max(1, min(width, height)))  # tiny samples: enlarge for a readable sheet
    cell_w, cell_h, label_h, pad = width * scale, height * scale, 16, 4
    sheet = Image.new(
        "RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + (k % columns) * (cell_w + pad)
        y = pad + (k // columns) * (cell_h + label_h + pad)
        sheet.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell_h + 2), label, fill="black", font=font)
    return sheet


def scatter_png(path: Path, points: Tensor, log_weights: Tensor, size: int = 480) -> None:
    """A scatter plot of 2-D points, dot area ∝ weight (PIL only)."""
    from PIL import Image, ImageDraw

    xy = points.reshape(points.shape[0], -1)[:, :2].double()
    w = log_weights.double().exp()
    w = w / w.max()
    low, high = xy.min(0).values, xy.max(0).values
    span = (high - low).clamp_min(1e-9)
    margin = 16
    uv = margin + (xy - low) / span * (size - 2 * margin)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for (u, v), weight in zip(uv.tolist(), w.tolist(), strict=True):
        r = 1.0 + 3.0 * math.sqrt(weight)
        draw.ellipse((u - r, size - v - r, u + r, size - v + r), fill=(31, 119, 180))
    image.save(path)


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """``(F, H, W, 3)`` uint8 frames to an MP4 (H.264 through imageio-ffmpeg)."""
    import imageio.v2 as imageio

    h, w = frames.shape[1:3]
    # yuv420p needs even sizes; the macro block size of 16 avoids ffmpeg's resize warning
    with imageio.get_writer(
        path,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        macro_block_size=1 if h % 2 == w % 2 == 0 else 16,
        ffmpeg_log_level="error",  # ffmpeg's own errors reach stderr
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    # the writer does not check ffmpeg's exit: a video it failed to write must not pass silently
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"ffmpeg wrote no {path.name} (its errors, if any, are on stderr)")


def trace_json(result: Any, spec: Any | None = None) -> dict[str, Any]:
    """The job's record: spec, events, weights, log Z, experts."""
    weights = result.weights.tolist()
    return {
        "spec": spec.model_dump(mode="json", by_alias=True) if spec is not None else None,
        "sample_shape": list(result.sample_shape),
        "num_particles": int(result.particles.shape[0]),
        "seconds": result.seconds,
        "transition": result.transition,
        "log_evidence": _finite(result.log_evidence),
        "best_index": result.best_index,
        "ess": result.ess,
        "weights": weights,
        "image_indices": list(result.image_indices),
        "experts": [dataclasses.asdict(r) for r in result.experts],
        "levels": [event.as_dict() for event in result.trace],
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_outputs(result: Any, out_dir: Path | str, spec: Any | None = None) -> list[Path]:
    """Write everything listed in the module docstring; the paths written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    weights = result.weights
    labels = [f"#{i} w={weights[i]:.3f}" for i in result.image_indices]
    fps = spec.output.fps if spec is not None else 8
    for k, image in enumerate(result.images):
        written.append(out / f"sample_{k:03d}.png")
        image.save(written[-1])
    if result.video is not None:
        for k, frames in enumerate(result.video):
            written.append(out / f"sample_{k:03d}.mp4")
            write_video(written[-1], frames, fps)
    sheet_wanted = spec is None or spec.output.contact_sheet
    if sheet_wanted and (result.images or result.video is not None):
        from PIL import Image

        tiles = list(result.images) or [Image.fromarray(v[len(v) // 2]) for v in result.video]
        written.append(out / "contact_sheet.png")
        contact_sheet(tiles, labels).save(written[-1])
    if result.particles[0].numel() == 2:
        written.append(out / "particles.png")
        scatter_png(written[-1], result.particles, result.log_weights)
    written.append(out / "particles.safetensors")
    save_file(
        {
            "particles": result.particles.contiguous(),
            "log_weights": result.log_weights.contiguous(),
        },
        str(written[-1]),
    )
    written.append(out / "trace.json")
    written[-1].write_text(json.dumps(trace_json(result, spec), indent=1, allow_nan=False))
    return written


__all__ = [
    "contact_sheet",
    "decode_result",
    "is_pixel_shape",
    "scatter_png",
    "to_uint8",
    "top_indices",
    "trace_json",
    "write_outputs",
    "write_video",
]
