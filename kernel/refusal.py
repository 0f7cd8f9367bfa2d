"""Why a server refuses a request, and the checks every server makes: no wire here.

Model adapters, the expert host and the Sampler raise :class:`ExpertError` ``(code, field,
reason)``; :mod:`poegen.kernel.errors` (the wire layer) turns it into a gRPC status and reads it
back. The code is a :class:`Code`, the canonical status codes numbered as on the wire
(``google.rpc.Code``), so an adapter refuses a request without importing gRPC::

    from poegen.kernel.refusal import ExpertError, validate_sigma

    def velocity(self, x, sigma, condition):
        validate_sigma(sigma, x.shape[0])        # INVALID_ARGUMENT on "sigma", "sigma.shape"
        if condition.tensors.get("image") is None:
            raise ExpertError.invalid("condition.tensors[image]", "this model needs an image")

Which code for what (DESIGN "The wire"): INVALID_ARGUMENT for bad shapes, dtypes, NaN and σ out
of range; NOT_FOUND for unknown handles; FAILED_PRECONDITION for a handle of a swapped-out
model; UNAVAILABLE only before the first model is ready (retryable); RESOURCE_EXHAUSTED over
size or batch limits; UNAUTHENTICATED / PERMISSION_DENIED for a missing or insufficient token;
INTERNAL for our own bugs only.

Reasons are sent to the client: they must not contain server paths, shared-memory segment
names, or anything else about the host.
"""

from __future__ import annotations

import enum
import math

import torch


class Code(enum.Enum):
    """The canonical status codes (``google.rpc.Code``), valued by their number on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ExpertError(Exception):
    """A request the server refuses: a status code, the offending field, and why.

    ``field`` is a path into the request (``"x.shape"``, ``"sigma"``, ``"handle"``), empty when
    no field is to blame. ``str(err)`` is the status message ``"<field>: <reason>"``.
    """

    def __init__(self, code: Code, field: str, reason: str) -> None:
        if not isinstance(code, Code):
            raise TypeError(f"ExpertError needs a refusal.Code, got {code!r}")
        if code is Code.OK:
            raise ValueError("ExpertError needs a non-OK status code")
        self.code = code
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)

    def __repr__(self) -> str:
        return f"ExpertError({self.code.name}, {self.field!r}, {self.reason!r})"

    @classmethod
    def invalid(cls, field: str, reason: str) -> ExpertError:
        """INVALID_ARGUMENT: bad shape, dtype, value (NaN, σ out of range), unset enum."""
        return cls(Code.INVALID_ARGUMENT, field, reason)

    @classmethod
    def not_found(cls, field: str, reason: str) -> ExpertError:
        """NOT_FOUND: an unknown condition handle."""
        return cls(Code.NOT_FOUND, field, reason)

    @classmethod
    def unavailable(cls, field: str, reason: str) -> ExpertError:
        """UNAVAILABLE: no model is ready yet (retryable)."""
        return cls(Code.UNAVAILABLE, field, reason)

    @classmethod
    def failed_precondition(cls, field: str, reason: str) -> ExpertError:
        """FAILED_PRECONDITION: a handle of a model that has been swapped out."""
        return cls(Code.FAILED_PRECONDITION, field, reason)

    @classmethod
    def resource_exhausted(cls, field: str, reason: str) -> ExpertError:
        """RESOURCE_EXHAUSTED: a tensor or batch over the server's limits."""
        return cls(Code.RESOURCE_EXHAUSTED, field, reason)

    @classmethod
    def deadline_exceeded(cls, field: str, reason: str) -> ExpertError:
        """DEADLINE_EXCEEDED: a backend the adapter waits on did not answer in time."""
        return cls(Code.DEADLINE_EXCEEDED, field, reason)

    @classmethod
    def unauthenticated(
        cls, field: str = "authorization", reason: str = "missing or invalid bearer token"
    ) -> ExpertError:
        """UNAUTHENTICATED: no valid credentials."""
        return cls(Code.UNAUTHENTICATED, field, reason)

    @classmethod
    def permission_denied(
        cls, field: str = "authorization", reason: str = "this call needs the admin token"
    ) -> ExpertError:
        """PERMISSION_DENIED: valid credentials that do not allow this call."""
        return cls(Code.PERMISSION_DENIED, field, reason)


def validate_finite(t: torch.Tensor, field: str) -> torch.Tensor:
    """``t`` unchanged; INVALID_ARGUMENT on ``field`` if a floating ``t`` holds NaN or ±inf."""
    if t.is_floating_point() and t.numel() and not all_finite(t):
        raise ExpertError.invalid(field, "contains NaN or infinity")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating ``t`` holds neither NaN nor ±inf, in one reduction when it does not.

    A sum is finite only if every term is (NaN and ±inf propagate through IEEE additions, in
    any order), so a finite sum proves the tensor finite; ``torch.isfinite(t).all()`` costs
    several times more (a bool tensor, then a reduction). A sum of finite terms may still
    overflow, so a non-finite sum falls back to the exact elementwise check. float16 sums
    accumulate into float32 (their range is small).
    """
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def validate_sigma(sigma: torch.Tensor, batch: int, field: str = "sigma") -> torch.Tensor:
    """``sigma`` unchanged if it is one finite noise level in (0, 1] per sample, shape (B,).

    INVALID_ARGUMENT on ``"<field>.shape"`` (not ``(batch,)``), ``"<field>.dtype"`` (not
    floating) or ``field`` (NaN, inf, ≤ 0 or > 1).
    """
    if tuple(sigma.shape) != (batch,):
        raise ExpertError.invalid(
            f"{field}.shape", f"shape {list(sigma.shape)}, expected [{batch}]: one per sample"
        )
    if not sigma.is_floating_point():
        raise ExpertError.invalid(f"{field}.dtype", f"{sigma.dtype}, expected a floating dtype")
    # B Python floats: cheaper than a handful of torch ops on a tensor this small
    values = sigma.tolist()
    if not all(math.isfinite(v) for v in values):
        raise ExpertError.invalid(field, "contains NaN or infinity")
    if not all(0 < v <= 1 for v in values):
        raise ExpertError.invalid(field, "each sigma must be in (0, 1]")
    return sigma


__all__ = ["Code", "ExpertError", "all_finite", "validate_finite", "validate_sigma"]
