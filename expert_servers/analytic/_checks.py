"""Validation at the edge of the analytic experts: every error names its field.

Parameters arrive as tensors or nested lists (YAML, entry points) and are held in float64 on the
CPU. Calls accept any floating dtype and compute in at least float32.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from poegen.kernel.experts import ExpertInfo, ExpertKind

PARAM_DTYPE = torch.float64


def as_param(value: object, field: str, *, allow_inf: bool = False) -> Tensor:
    """A float64 CPU copy of ``value``; ``ValueError`` naming ``field`` if not numeric/finite."""
    try:
        if isinstance(value, Tensor):
            value = value.detach()
        t = torch.as_tensor(value, dtype=PARAM_DTYPE, device="cpu").clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{field}: not a numeric array ({err})") from None
    bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"{field}: must be {'not NaN' if allow_inf else 'finite'}")
    return t


def as_shape(value: Sequence[int] | None, field: str) -> tuple[int, ...] | None:
    """A sample shape as a tuple of positive ints, or ``None``."""
    if value is None:
        return None
    shape = tuple(int(s) for s in value)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{field}: must be a non-empty tuple of positive sizes, got {value}")
    return shape


def resolve_shape(sample_shape: Sequence[int] | None, dim: int, field: str) -> tuple[int, ...]:
    """``sample_shape`` (checked against ``dim`` coordinates), defaulting to ``(dim,)``."""
    shape = as_shape(sample_shape, field)
    if shape is None:
        return (dim,)
    if math.prod(shape) != dim:
        raise ValueError(f"{field}: {shape} has {math.prod(shape)} elements, the parameters {dim}")
    return shape


def as_max_batch(value: int | None) -> int | None:
    if value is not None and int(value) < 1:
        raise ValueError(f"max_batch: must be positive, got {value}")
    return None if value is None else int(value)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 compute in float32."""
    return torch.promote_types(x.dtype, torch.float32)


def flat_batch(
    x: Tensor, sample_shape: tuple[int, ...], max_batch: int | None, field: str = "x"
) -> Tensor:
    """Check ``x`` is ``(B, *S)`` and floating; return it as ``(B, d)`` in the compute dtype."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{field}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{field}: expected a floating dtype, got {x.dtype}")
    if x.ndim != len(sample_shape) + 1 or tuple(x.shape[1:]) != sample_shape:
        want = ", ".join(["B", *map(str, sample_shape)])
        raise ValueError(f"{field}: expected shape ({want}), got {tuple(x.shape)}")
    if max_batch is not None and x.shape[0] > max_batch:
        raise ValueError(f"{field}: batch of {x.shape[0]} exceeds max_batch {max_batch}")
    return x.reshape(x.shape[0], -1).to(compute_dtype(x))


def batch_sigma(sigma: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """σ as ``(B,)`` in ``like``'s dtype and device; each value finite and in [0, 1]."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma: expected shape ({batch},) or (), got {tuple(s.shape)}")
    if not ((s >= 0) & (s <= 1)).all():
        raise ValueError("sigma: every value must lie in [0, 1]")
    return s


def revision(*tensors: Tensor, extra: str = "") -> str:
    """A stable 12-hex-digit hash of float64 parameters (same across processes and machines)."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        a = t.detach().to("cpu", PARAM_DTYPE).contiguous()
        h.update(str(tuple(a.shape)).encode())
        h.update(a.numpy().astype("<f8").tobytes())
    return h.hexdigest()[:12]


class PotentialExpert:
    """Shared plumbing of the analytic rewards and constraints: description, name, shape.

    Subclasses set ``_kind`` and the attributes below, and give their parameters in
    ``_params()`` (they make up the revision).
    """

    _kind: ExpertKind
    _name: str
    _shape: tuple[int, ...]
    _max_batch: int | None

    def _params(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name=self._name,
            kind=self._kind,
            sample_shape=self._shape,
            max_batch=self._max_batch,
            model_id="analytic",
            revision=revision(*self._params(), extra=f"{type(self).__name__}{self._shape}"),
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dim(self) -> int:
        return math.prod(self._shape)

    def _flat(self, x0: Tensor) -> Tensor:
        return flat_batch(x0, self._shape, self._max_batch, field="x0")
