"""The wire's side of refusals: gRPC statuses from and to :class:`ExpertError`.

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

The refusal itself (:class:`~poegen.kernel.refusal.ExpertError`, its :class:`Code`) is
wire-free, in :mod:`poegen.kernel.refusal`, so that model adapters raise it without importing
gRPC; this module is its one mapping to and from gRPC statuses. Any exception other than
``ExpertError`` (or an abort the method did itself) becomes INTERNAL with a generic message and
an incident id; the traceback goes to this module's logger, never to the reply.

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

from poegen.kernel.refusal import Code, ExpertError

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


def grpc_code(code: Code) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a refusal's ``code``."""
    return _GRPC[code]


def code_of(status: grpc.StatusCode) -> Code:
    """The refusal :class:`Code` of a ``grpc.StatusCode``."""
    return Code(status.value[0])


_GRPC = {Code(status.value[0]): status for status in grpc.StatusCode}


def to_status(err: ExpertError) -> grpc.Status:
    """The gRPC status of ``err``: code, message, and a BadRequest field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.reason)
    status = status_pb2.Status(code=err.code.value, message=str(err))
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
    if status is None or status.code not in _NUMBERS or status.code == 0:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                violation = bad.field_violations[0]
                return ExpertError(Code(status.code), violation.field, violation.description)
    return None


_NUMBERS = frozenset(code.value for code in Code)

__all__ = [
    "Code", "ExpertError", "abort", "code_of", "from_rpc_error", "grpc_code", "maps_errors",
    "to_status",
]  # fmt: skip
