"""Autoregressive (frame-chunk) annealing: a video made chunk by chunk, one job per chunk.

The paper's second annealing path. Instead of one run annealing all F frames of a video at
once, the frames are cut into chunks c_0, c_1, … of at most ``chunk_size`` frames and chunk k is
one Sampler job whose target is the product over the frames made so far with those frames
fixed: for a product p(x) ∝ Π_j φ_j(x) over the frames, chunk k's job targets

    π_k(x_{c_k}) ∝ Π_{j touching c_k} φ_j(x_{c_<k} = x̄_{c_<k}, x_{c_k})

where x̄_{c_<k} are the frames already made. Factors touching only earlier frames are constants
and drop out; factors across the boundary (a temporal tie between the last made frame and the
first new one) take the fixed frames as their **condition** — a tensor of the spec — so every
chunk is an ordinary job with its own intermediate targets, resampling and moves. The chunk's
result is one particle (by default the best, :func:`best_particle`), whose frames are appended.

This module is the loop only: :func:`generate_autoregressive` asks ``spec_for(chunk,
made)`` for each chunk's :class:`~poegen.clients.spec.GenerationSpec` (or its mapping), given
the frames made so far, and runs it with ``client.generate`` — a
:class:`~poegen.clients.sdk.Client` against a Sampler service or in-process, so any model
family's experts can be driven this way. The kernel is untouched: nothing here is new math.

    from poegen.clients.autoregressive import generate_autoregressive
    video = generate_autoregressive(client, spec_for, frames=12, chunk_size=4)
    video.frames            # (F, ...) the made frames, frame axis first (frame_dim=0)

With ``chunk_size >= frames`` it is exactly the one joint job ``spec_for(Chunk(0, 0, F), None)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.clients.spec import GenerationSpec

__all__ = [
    "AutoregressiveResult",
    "Chunk",
    "best_particle",
    "chunks",
    "generate_autoregressive",
    "tensor_file",
]


@dataclass(frozen=True, slots=True)
class Chunk:
    """Frames [start, stop) of the video, the ``index``-th chunk."""

    index: int
    start: int
    stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class AutoregressiveResult:
    """The video and the jobs that made it.

    Attributes:
        frames: the made frames, the frame axis at ``frame_dim`` of the sample shape.
        chunks: the chunks in order.
        results: each chunk's job result (``GenerationResult``).
        picked: the particle index kept from each chunk's result.
    """

    frames: Tensor
    chunks: tuple[Chunk, ...]
    results: tuple[Any, ...]
    picked: tuple[int, ...]

    @property
    def evaluations(self) -> int:
        """Expert evaluations (samples summed over experts and levels) of all chunks."""
        return sum(s for r in self.results for e in r.trace for (_, _, s) in e.timings.values())


def chunks(frames: int, chunk_size: int) -> tuple[Chunk, ...]:
    """[0, F) cut into consecutive chunks of ``chunk_size`` frames (the last may be shorter)."""
    if frames < 1:
        raise ValueError(f"frames: must be positive, got {frames}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    starts = range(0, frames, chunk_size)
    return tuple(Chunk(k, s, min(s + chunk_size, frames)) for k, s in enumerate(starts))


def best_particle(result: Any) -> int:
    """The job's best particle (``result.best_index``)."""
    return int(result.best_index)


def tensor_file(directory: Path, name: str, tensor: Tensor) -> dict[str, str]:
    """``tensor`` saved as ``directory/name.safetensors`` (key ``name``): a spec's condition
    tensor or region mask (``{"file", "key"}``)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file({name: tensor.detach().to("cpu").contiguous()}, str(path))
    return {"file": str(path), "key": name}


SpecFor = Callable[[Chunk, Tensor | None], GenerationSpec | Mapping[str, Any]]


def generate_autoregressive(
    client: Any,
    spec_for: SpecFor,
    frames: int,
    chunk_size: int,
    *,
    frame_dim: int = 0,
    pick: Callable[[Any], int] = best_particle,
    on_chunk: Callable[[Chunk, Any], None] | None = None,
    timeout: float | None = None,
) -> AutoregressiveResult:
    """Make ``frames`` frames chunk by chunk (see the module docstring).

    Args:
        client: anything with ``generate(spec, timeout=)`` returning a result with
            ``particles`` ``(N, *S)``, ``best_index`` and ``trace`` (a ``poegen`` Client).
        spec_for: ``(chunk, made) -> spec`` of the chunk's job; ``made`` holds the frames made
            so far (``None`` for the first chunk), frame axis at ``frame_dim``. The spec's
            sample shape must have ``chunk.frames`` frames at ``frame_dim``.
        frames, chunk_size: the video's length and the frames per job.
        frame_dim: the frame axis of one sample (0 for ``(F, H, W)``, 1 for ``(C, F, H, W)``).
        pick: which particle of a chunk's result is kept (default: the best).
        on_chunk: called with each chunk and its result as it finishes (progress).
    """
    made: Tensor | None = None
    results, picked = [], []
    plan = chunks(frames, chunk_size)
    for chunk in plan:
        spec = spec_for(chunk, made)
        if not isinstance(spec, GenerationSpec):
            spec = GenerationSpec.from_mapping(spec)
        shape = spec.sample_shape
        if shape is None or not 0 <= frame_dim < len(shape) or shape[frame_dim] != chunk.frames:
            raise ValueError(
                f"spec_for: chunk {chunk.index} needs a sample_shape with {chunk.frames} "
                f"frames at dimension {frame_dim}, got {shape}"
            )
        result = client.generate(spec, timeout=timeout)
        index = pick(result)
        new = result.particles[index]
        made = new if made is None else torch.cat([made, new.to(made.dtype)], dim=frame_dim)
        results.append(result)
        picked.append(index)
        if on_chunk is not None:
            on_chunk(chunk, result)
    assert made is not None
    return AutoregressiveResult(made, plan, tuple(results), tuple(picked))
