"""What the flow adapters share: load options, folder checks, input checks, schedules.

Options (``LoadModel`` options / ``poegen serve --option``), all strings on the wire:

* ``torch_dtype``: ``float32`` (default), ``float16``, ``bfloat16``;
* ``device``: a torch device string (default ``cpu``);
* ``cpu_offload``: ``none`` (default), ``model`` or ``sequential`` (diffusers'
  ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``; needs an accelerator);
* ``guidance_scale``: the default guidance of a condition (FLUX's guidance embedding, the CFG
  scale of SD3 and Wan); a condition's scalar ``guidance_scale`` overrides it;
* ``negative_prompt``: the default negative prompt (SD3, Wan); a condition's
  ``negative_text`` overrides it;
* ``max_sequence_length``: the T5/UMT5 token limit of the prompt encoders;
* ``latent_space``: overrides the name announced in ``Describe``;
* ``max_batch``: the largest batch one call may carry (the kernel chunks larger batches).

Family-specific options are listed by each adapter. An unknown option, or a bad value, is an
``ExpertError`` on ``options[<name>]``. A missing folder, or a folder of another family, is an
``ExpertError`` on ``model_id`` that names the id as the client sent it, never a server path.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition, ModelRef
from poegen.kernel.refusal import ExpertError, validate_sigma

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMMON_OPTIONS = frozenset({"torch_dtype", "device", "cpu_offload", "latent_space", "max_batch"})
OFFLOAD = ("none", "model", "sequential")


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """The parsed options every flow adapter accepts (see the module docstring)."""

    torch_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_offload: str = "none"
    latent_space: str = ""
    extra: Mapping[str, str] | None = None
    max_batch: int | None = None

    def get(self, name: str, default: str) -> str:
        return (self.extra or {}).get(name, default)

    def number(self, name: str, default: float, *, positive: bool = False) -> float:
        """A finite float option (``options[name]``)."""
        raw = self.get(name, "")
        if raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ExpertError.invalid(f"options[{name}]", f"{raw!r} is not a number") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise ExpertError.invalid(f"options[{name}]", "must be finite and positive")
        return value

    def integer(self, name: str, default: int) -> int:
        raw = self.get(name, "")
        if raw == "":
            return default
        if not raw.isdigit() or int(raw) < 1:
            raise ExpertError.invalid(f"options[{name}]", f"{raw!r} is not a positive integer")
        return int(raw)


def parse_options(options: Mapping[str, str], extra: Iterable[str] = ()) -> LoadOptions:
    """Validate ``options`` against the common names plus ``extra``."""
    known = COMMON_OPTIONS | set(extra)
    for name in options:
        if name not in known:
            raise ExpertError.invalid(
                f"options[{name}]", f"unknown option (known: {', '.join(sorted(known))})"
            )
    dtype_name = options.get("torch_dtype", "float32")
    if dtype_name not in DTYPES:
        raise ExpertError.invalid(
            "options[torch_dtype]", f"{dtype_name!r}, expected one of {sorted(DTYPES)}"
        )
    try:
        device = torch.device(options.get("device", "cpu"))
    except RuntimeError:
        raise ExpertError.invalid("options[device]", "not a torch device string") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExpertError.invalid("options[device]", "this server has no CUDA device")
    offload = options.get("cpu_offload", "none")
    if offload not in OFFLOAD:
        raise ExpertError.invalid("options[cpu_offload]", f"{offload!r}, expected one of {OFFLOAD}")
    rest = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    max_batch = options.get("max_batch", "")
    if max_batch and (not max_batch.isdigit() or int(max_batch) < 1):
        raise ExpertError.invalid("options[max_batch]", f"{max_batch!r} is not a positive integer")
    return LoadOptions(
        DTYPES[dtype_name], device, offload, options.get("latent_space", ""), rest or None,
        int(max_batch) if max_batch else None,
    )  # fmt: skip


# ---------------------------------------------------------------------- folders


def model_folder(ref: ModelRef) -> Path:
    """The folder of ``ref``: its resolved path, or a hub id's snapshot in the local cache."""
    if ref.path is not None:
        if not ref.path.is_dir():
            raise ExpertError.not_found("model_id", f"{ref.model_id!r} is not a model folder")
        return ref.path
    from huggingface_hub import snapshot_download  # a hub id: the local cache only

    try:
        return Path(snapshot_download(ref.model_id, local_files_only=True))
    except Exception:
        raise ExpertError.not_found(
            "model_id", f"{ref.model_id!r} is not in the local model cache"
        ) from None


def read_json(path: Path, ref: ModelRef, what: str) -> dict[str, Any]:
    """A JSON file of the folder; a missing or malformed file names the id, not the path."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ExpertError.invalid("model_id", f"{ref.model_id!r} has no readable {what}") from None
    if not isinstance(data, dict):
        raise ExpertError.invalid("model_id", f"{ref.model_id!r}: {what} is not a JSON object")
    return data


def pipeline_class_name(folder: Path, ref: ModelRef, accepted: Iterable[str], family: str) -> str:
    """``_class_name`` of the folder's ``model_index.json``, checked against ``accepted``."""
    index = read_json(folder / "model_index.json", ref, "model_index.json")
    name = str(index.get("_class_name", ""))
    accepted = tuple(accepted)
    if name not in accepted:
        raise ExpertError.invalid(
            "model_id",
            f"{ref.model_id!r} is a {name or 'unknown'} folder, not a {family} model "
            f"(expected one of {', '.join(accepted)})",
        )
    return name


def load_pipeline(cls: type[_T], folder: Path, ref: ModelRef, opts: LoadOptions, **kw: Any) -> _T:
    """``cls.from_pretrained(folder)`` with the options' dtype, placed on its device.

    Weights load from safetensors only (``use_safetensors=True``: a folder with pickled
    ``.bin`` weights is refused) and no remote code runs (diffusers' default).
    """
    try:
        pipe = cls.from_pretrained(  # type: ignore[attr-defined]
            folder, dtype=opts.torch_dtype, use_safetensors=True, **kw
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("loading %r failed: %s", ref.model_id, type(e).__name__)
        raise ExpertError.invalid(
            "model_id", f"{ref.model_id!r} could not be loaded as {cls.__name__}"
        ) from None
    place(pipe, opts)
    return pipe


def place(pipe: Any, opts: LoadOptions) -> None:
    """Move the pipeline's models to the device, or hand them to diffusers' CPU offload."""
    if opts.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=opts.device)
    elif opts.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=opts.device)
    else:
        pipe.to(opts.device)


def model_revision(folder: Path) -> str:
    """The hub snapshot's commit when the folder is one, else empty."""
    parent = folder.parent
    return folder.name if parent.name == "snapshots" else ""


# ---------------------------------------------------------------------- conditions


def condition_scalar(condition: Condition, name: str, default: float) -> float:
    value = condition.scalars.get(name, default)
    if not math.isfinite(value):
        raise ExpertError.invalid(f"condition.scalars[{name}]", "must be finite")
    return float(value)


def check_keys(condition: Condition, tensors: Iterable[str], scalars: Iterable[str]) -> None:
    """Refuse condition entries the expert does not read (a typo must not pass silently)."""
    tensors, scalars = set(tensors), set(scalars)
    for name in condition.tensors:
        if name not in tensors:
            known = ", ".join(sorted(tensors)) or "none"
            raise ExpertError.invalid(f"condition.tensors[{name}]", f"unknown (known: {known})")
    for name in condition.scalars:
        if name not in scalars:
            known = ", ".join(sorted(scalars)) or "none"
            raise ExpertError.invalid(f"condition.scalars[{name}]", f"unknown (known: {known})")


def check_pixels(t: Tensor, field: str, channels: int, ndim: int) -> None:
    """An image ``(B, C, H, W)`` (ndim 4) or a video ``(B, C, F, H, W)`` (ndim 5)."""
    layout = "(B, C, H, W)" if ndim == 4 else "(B, C, F, H, W)"
    if t.ndim != ndim:
        raise ExpertError.invalid(f"{field}.shape", f"{list(t.shape)}, expected {layout}")
    if t.shape[1] != channels:
        raise ExpertError.invalid(
            f"{field}.shape", f"{t.shape[1]} channels, expected {channels} {layout}"
        )
    if not t.is_floating_point():
        raise ExpertError.invalid(f"{field}.dtype", f"{t.dtype}, expected a floating dtype")


def check_batch(x: Tensor, sigma: Tensor, channels: int, ndim: int) -> None:
    """``x`` of the model's layout and ``sigma`` one level in (0, 1] per sample."""
    check_pixels(x, "x", channels, ndim)
    validate_sigma(sigma, int(x.shape[0]))


def check_multiple(x: Tensor, field: str, dims: Iterable[int], multiple: int) -> None:
    """Each of ``x``'s ``dims`` must be a positive multiple of ``multiple``."""
    for d in dims:
        if x.shape[d] < multiple or x.shape[d] % multiple:
            raise ExpertError.invalid(
                f"{field}.shape", f"dimension {d} is {x.shape[d]}, not a multiple of {multiple}"
            )


def timesteps(sigma: Tensor, num_train_timesteps: int, dtype: torch.dtype) -> Tensor:
    """t = σ·T as the scheduler computes it (float32), then in the model's dtype."""
    return (sigma.to(torch.float32) * num_train_timesteps).to(dtype)


def scheduler_sigmas(scheduler: Any) -> list[float]:
    """The grid of a scheduler after ``set_timesteps``: num_steps + 1 levels from 1 to 0."""
    sigmas = [float(s) for s in scheduler.sigmas.cpu()]
    if sigmas[0] != 1.0 or sigmas[-1] != 0.0:
        raise ExpertError.failed_precondition(
            "num_steps", "the model's scheduler does not give a grid from 1 to 0"
        )
    return sigmas


def check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1 or num_steps > 10_000:
        raise ExpertError.invalid("num_steps", f"{num_steps!r}, expected 1 … 10000")


class Lazy:
    """A value computed once, on first use, thread-safely (the default condition)."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value
