"""OpenTelemetry traces across the wire, off by default (``tracing: true`` in a host's config,
``tracing=True`` on a client; the ``tracing`` extra installs the packages).

When on, every RPC is a span: the client's (the SDK's ``Generate``, the Sampler's expert calls)
and the server's, linked by the trace context gRPC metadata carries, so one trace runs from a
client through the Sampler's job to every expert call it makes. The interceptors are the
``opentelemetry-instrumentation-grpc`` package's, added to poegen's own servers and channels
only (nothing is patched globally). Where spans go is the OpenTelemetry SDK's business: with no
tracer provider configured (``opentelemetry-instrument``, or ``trace.set_tracer_provider``) they
are dropped, so no exporter runs unless one is set up.

The Sampler's jobs run in their own threads and call experts from worker threads, where the
request's context would be lost; :func:`current` takes it where the job is admitted and
:func:`attached` puts it back around each expert call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc

INSTALL = "tracing: needs the OpenTelemetry packages (pip install 'poegen[tracing]')"


def available() -> bool:
    try:
        import opentelemetry.instrumentation.grpc  # noqa: F401
    except ImportError:
        return False
    return True


def check(enabled: bool) -> None:
    """ValueError at start-up when tracing is asked for and cannot be done."""
    if enabled and not available():
        raise ValueError(INSTALL)


def server_interceptors(enabled: bool) -> list[grpc.aio.ServerInterceptor]:
    if not enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def aio_client_interceptors(enabled: bool) -> list[Any] | None:
    if not enabled:
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors as interceptors

    return list(interceptors())


def traced_channel(channel: grpc.Channel, enabled: bool) -> grpc.Channel:
    """``channel`` whose calls are client spans (when ``enabled``)."""
    if not enabled:
        return channel
    # the package's own intercept_channel: its client interceptor is not a grpc.*Interceptor
    from opentelemetry.instrumentation.grpc import client_interceptor, intercept_channel

    return intercept_channel(channel, client_interceptor())


def current(enabled: bool) -> Any | None:
    """The OpenTelemetry context of this thread (the RPC being served), or None."""
    if not enabled:
        return None
    from opentelemetry import context

    return context.get_current()


@contextlib.contextmanager
def attached(trace_context: Any | None) -> Iterator[None]:
    """Run the block in ``trace_context`` (from :func:`current`); nothing when None."""
    if trace_context is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(trace_context)
    try:
        yield
    finally:
        context.detach(token)
