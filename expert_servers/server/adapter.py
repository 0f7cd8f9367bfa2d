"""The adapter interface: how the host gets an Expert for a model id.

The host serves any object implementing :class:`poegen.kernel.experts.Expert`. What it needs
from a model family is one method::

    class MyAdapter:
        def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
            ...  # read ref.path (already resolved under the model root), build the expert

``load`` runs in a worker thread, beside the model currently served; it may call
``progress(fraction, message)`` from that thread. It raises
:class:`poegen.kernel.refusal.ExpertError` for a bad id or options; any other exception is
logged and answered as a failed load that names no server path. The host, never the adapter,
checks the id against the model root and the allowlist (:func:`resolve_model_id`).

Optional methods of the served expert, found with ``isinstance`` on the protocols below:

* ``prepare(condition) -> Expert`` (:class:`Conditionable`): encode a :class:`Condition` once
  (a prompt through the text encoder, an input image through the VAE) and return a
  *conditioned view*, an Expert answering for that condition; ``Prepare`` maps a handle to
  the view. Experts without it accept only the empty condition.
* ``encode(pixels)`` / ``decode(latents)`` (:class:`Autoencoder`): the expert's VAE, for
  ``Encode``/``Decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor

from poegen.kernel.experts import Expert

Progress = Callable[[float, str], None]
"""``progress(fraction in [0, 1], message)``; messages must not contain server paths."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model id accepted by the host.

    Attributes:
        model_id: the id as the client sent it (safe to echo in replies and logs).
        path: where it lies, resolved inside the model root; ``None`` for an allowlisted id
            that is not a path (e.g. a hub id the adapter resolves from its local cache).
    """

    model_id: str
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What an adapter returns: the expert plus what the wire says about it.

    Attributes:
        expert: the Expert to serve.
        latent_space: name of its latent space ("flux-vae-16"); experts summed together must
            share it.
        max_batch: the largest batch one call may carry, overriding the expert's own limit;
            ``None`` keeps the expert's.
        concurrent: whether the expert answers calls from several threads at once correctly
            (pure tensor functions, like the analytic experts). ``False`` for a library model
            (diffusers, transformers, MuJoCo): the host then runs one of its calls at a time.
            A FLUX pipeline called from three threads on freshly prepared conditions was seen
            to return another velocity for the same input now and then (a job then did not
            reproduce), and never with one call at a time.
    """

    expert: Expert
    latent_space: str = ""
    max_batch: int | None = None
    concurrent: bool = True


@dataclass(frozen=True, slots=True)
class Condition:
    """A decoded ``poegen.v1.Condition``: text, named tensors, named scalars and the negative
    prompt of classifier-free guidance."""

    text: str = ""
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)
    negative_text: str = ""

    def is_empty(self) -> bool:
        return not (self.text or self.tensors or self.scalars or self.negative_text)


class ModelAdapter(Protocol):
    """Loads the expert for a model id (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        """Build the expert for ``ref``; runs in a worker thread."""
        ...


@runtime_checkable
class Conditionable(Protocol):
    """An expert that encodes conditions into conditioned views of itself."""

    def prepare(self, condition: Condition) -> Expert:
        """An Expert answering for ``condition``; raise ExpertError for a bad condition."""
        ...


@runtime_checkable
class Autoencoder(Protocol):
    """An expert with a VAE: pixels in [-1, 1] ↔ latents."""

    def encode(self, pixels: Tensor) -> Tensor:
        """Latents of ``pixels`` ``(B, C, H, W)`` or ``(B, C, F, H, W)``."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [-1, 1] of ``latents``."""
        ...
