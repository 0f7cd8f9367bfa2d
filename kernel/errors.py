"""One error type for the wire, and its mapping to gRPC status codes.

Servers validate at the edge and raise :class:`ExpertError` ``(code, field, reason)``; one
decorator, :func:`maps_errors`, turns it into the reply's status. Clients read it back with
:func:`from_rpc_error`. The status carries the code, the message ``"<field>: <reason>"`` and,
in the ``grpc-status-details-bin`` trailer, a ``google.rpc.Status`` whose one detail is a
``google.rpc.BadRequest`` with one field violation ``(field, description=reason)``::

    from poegen.kernel.errors import ExpertError, from_rpc_error, maps_errors

    class Servicer(expert_pb2_grpc.ExpertServiceServicer):
        @maps_errors
        async def Velocity(self, request, context):
            x = codec.decode(request.x, field="x", max_bytes=self.max_bytes)
            ...                               # may raise ExpertError.invalid("sigma", "...")

    try:
        await stub.Velocity(request)
    except grpc.aio.AioRpcError as e:
        err = from_rpc_error(e)               # ExpertError, or None for transport errors
        if err is not None and err.field == "x.shape": ...

Codes (DESIGN "The wire"): INVALID_ARGUMENT for bad shapes, dtypes, NaN and σ out of range;
NOT_FOUND for unknown handles; FAILED_PRECONDITION for a handle of a swapped-out model;
UNAVAILABLE only before the first model is ready (retryable); RESOURCE_EXHAUSTED over size or
batch limits; UNAUTHENTICATED / PERMISSION_DENIED for a missing or insufficient token;
INTERNAL for our own bugs only. Any exception other than ``ExpertError`` (or an abort the
method did itself) becomes INTERNAL with a generic message and an incident id; the traceback
goes to this module's logger, never to the reply.

Reasons are sent to the client: they must not contain server paths, shared-memory segment
names, or anything else about the host.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ExpertError(Exception):
    """A request the server refuses: a gRPC code, the offending field, and why.

    ``field`` is a path into the request (``"x.shape"``, ``"sigma"``, ``"handle"``), empty when
    no field is to blame. ``str(err)`` is the status message ``"<field>: <reason>"``.
    """

    def __init__(self, code: grpc.StatusCode, field: str, reason: str) -> None:
        if code is grpc.StatusCode.OK:
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
        return cls(grpc.StatusCode.INVALID_ARGUMENT, field, reason)

    @classmethod
    def not_found(cls, field: str, reason: str) -> ExpertError:
        """NOT_FOUND: an unknown condition handle."""
        return cls(grpc.StatusCode.NOT_FOUND, field, reason)

    @classmethod
    def unavailable(cls, field: str, reason: str) -> ExpertError:
        """UNAVAILABLE: no model is ready yet (retryable)."""
        return cls(grpc.StatusCode.UNAVAILABLE, field, reason)

    @classmethod
    def failed_precondition(cls, field: str, reason: str) -> ExpertError:
        """FAILED_PRECONDITION: a handle of a model that has been swapped out."""
        return cls(grpc.StatusCode.FAILED_PRECONDITION, field, reason)

    @classmethod
    def resource_exhausted(cls, field: str, reason: str) -> ExpertError:
        """RESOURCE_EXHAUSTED: a tensor or batch over the server's limits."""
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, field, reason)

    @classmethod
    def unauthenticated(
        cls, field: str = "authorization", reason: str = "missing or invalid bearer token"
    ) -> ExpertError:
        """UNAUTHENTICATED: no valid credentials."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, field, reason)

    @classmethod
    def permission_denied(
        cls, field: str = "authorization", reason: str = "this call needs the admin token"
    ) -> ExpertError:
        """PERMISSION_DENIED: valid credentials that do not allow this call."""
        return cls(grpc.StatusCode.PERMISSION_DENIED, field, reason)


def to_status(err: ExpertError) -> grpc.Status:
    """The gRPC status of ``err``: code, message, and a BadRequest field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.reason)
    status = status_pb2.Status(code=err.code.value[0], message=str(err))
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, err: ExpertError) -> NoReturn:
    """End the current RPC with ``err``'s status (raises ``grpc.aio.AbortError``)."""
    await context.abort_with_status(to_status(err))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _abort_internal(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    # Called from inside an `except` block: logger.exception records the active traceback.
    incident = secrets.token_hex(4)
    logger.exception("internal error in %s (incident %s)", method, incident)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
    raise AssertionError("abort returned")  # pragma: no cover


def maps_errors(method: _F) -> _F:
    """Decorate a grpc.aio servicer method so that its errors become gRPC statuses.

    Works on ``async def`` methods (unary replies) and ``async def`` generators (server
    streams). ``ExpertError`` → its code and BadRequest; ``grpc.aio.AbortError`` (the method
    aborted itself) and cancellation pass through; any other exception → INTERNAL with a
    generic message, its traceback logged.
    """
    name = method.__qualname__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for reply in method(self, request, context):
                    yield reply
            except ExpertError as err:
                await abort(context, err)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _abort_internal(context, name)

        return stream  # type: ignore[return-value]
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(self, request, context)
            except ExpertError as err:
                await abort(context, err)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _abort_internal(context, name)

        return unary  # type: ignore[return-value]
    raise TypeError(f"maps_errors needs an async def method or async generator, got {name}")


def from_rpc_error(e: grpc.RpcError) -> ExpertError | None:
    """The ``ExpertError`` a server sent, read from the status details of a failed call.

    Works for ``grpc.aio.AioRpcError`` and the sync ``grpc.RpcError`` (both are ``grpc.Call``).
    ``None`` when the status carries no BadRequest: a transport error, a deadline, an INTERNAL
    error, or a server that is not poegen's.
    """
    try:
        status = rpc_status.from_call(e)  # type: ignore[arg-type]
    except (AttributeError, ValueError):  # not a Call, or details inconsistent with the status
        return None
    if status is None or status.code not in _CODES or status.code == 0:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                violation = bad.field_violations[0]
                return ExpertError(_CODES[status.code], violation.field, violation.description)
    return None


__all__ = ["ExpertError", "abort", "from_rpc_error", "maps_errors", "to_status"]
