"""Server interceptors: the bearer token, and per-RPC metrics.

* :class:`TokenInterceptor` (from :mod:`poegen.kernel.transport`, shared with the sampler
  service) checks ``authorization: Bearer <token>`` on every RPC except the
  standard ``grpc.health.v1.Health`` service (Kubernetes probes carry no token), comparing in
  constant time; a missing or wrong token ends the call with UNAUTHENTICATED before any
  servicer code runs.
* :func:`check_admin` is the second gate of ``LoadModel``: the ``x-poegen-admin-token``
  metadata must equal the admin token (PERMISSION_DENIED otherwise, and always when the server
  has no admin token configured).
* :class:`MetricsInterceptor` times every RPC and counts non-OK codes. It wraps the handlers
  the later interceptors return, so calls refused for their token are counted too.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from poegen.expert_servers.server.metrics import ServerMetrics
from poegen.kernel.refusal import ExpertError
from poegen.kernel.transport import (
    AUTHORIZATION,
    HEALTH_PREFIX,
    TokenInterceptor,
    metadata_value,
    same_secret,
)

ADMIN_TOKEN = "x-poegen-admin-token"

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def check_admin(context: grpc.aio.ServicerContext, admin_token: str | None) -> None:
    """Raise PERMISSION_DENIED unless the call carries the admin token."""
    if admin_token is None:
        raise ExpertError.permission_denied(ADMIN_TOKEN, "LoadModel is off: no admin token set")
    given = metadata_value(context.invocation_metadata(), ADMIN_TOKEN)
    if not same_secret(given, admin_token):
        raise ExpertError.permission_denied(ADMIN_TOKEN, "missing or invalid admin token")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Latency histogram and error counter per method."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await behavior(request, context)
                finally:
                    self._observe(method, context, start)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                try:
                    async for reply in stream_behavior(request, context):
                        yield reply
                finally:
                    self._observe(method, context, start)

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        if handler.unary_stream:
            # a stream written with context.write() (health Watch): a coroutine, not a generator
            write_behavior = handler.unary_stream

            async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
                start = time.perf_counter()
                try:
                    await write_behavior(request, context)
                finally:
                    self._observe(method, context, start)

            return grpc.unary_stream_rpc_method_handler(written, **kwargs)
        return handler  # client-streaming RPCs (reflection): not timed

    def _observe(self, method: str, context: grpc.aio.ServicerContext, start: float) -> None:
        self._metrics.latency.labels(method=method).observe(time.perf_counter() - start)
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK and code != 0:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self._metrics.errors.labels(method=method, code=name).inc()


__all__ = [
    "ADMIN_TOKEN",
    "AUTHORIZATION",
    "HEALTH_PREFIX",
    "MetricsInterceptor",
    "TokenInterceptor",
    "check_admin",
]
