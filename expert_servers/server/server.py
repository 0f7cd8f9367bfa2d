"""The generic expert host: one grpc.aio server for any Expert.

::

    host, port = create_server(ServerConfig(port=0), expert=my_expert)   # binds at once
    await host.start()          # health: SERVING (NOT_SERVING while no model is loaded)
    ...
    await host.stop()           # health NOT_SERVING, refuse new calls, drain in-flight ones

or, for a process, ``await serve(config, expert=...)``, which also stops on SIGTERM/SIGINT and
returns 0 once the in-flight calls are done (or the grace period is over).

The host wires: the ``ExpertService`` servicer; the standard ``grpc.health.v1`` service
(service names ``""`` and ``poegen.v1.ExpertService``) and reflection; interceptors for
metrics and, when configured, the bearer token (health exempt); TLS or mTLS; message size and
keepalive options; a thread pool for model calls and one for loads; Prometheus metrics on an
optional HTTP port. Everything belongs to the :class:`ExpertHost` instance, so one process
may run several (the tests do).

Call :func:`create_server` from inside the event loop that will run the server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from poegen.expert_servers.server.adapter import ModelAdapter, ServedModel
from poegen.expert_servers.server.batching import DynamicBatcher
from poegen.expert_servers.server.config import ServerConfig
from poegen.expert_servers.server.handles import HandleTable
from poegen.expert_servers.server.interceptors import MetricsInterceptor
from poegen.expert_servers.server.metrics import ServerMetrics
from poegen.expert_servers.server.models import LoadedModel, ModelManager
from poegen.expert_servers.server.service import ExpertServicer, WireLimits
from poegen.expert_servers.server.serving import ExpertServing
from poegen.kernel import tracing
from poegen.kernel.calls import worker_pool
from poegen.kernel.codec import SharedMemoryReader, parser
from poegen.kernel.experts import Expert
from poegen.kernel.transport import (
    InflightLimit,
    TokenInterceptor,
    add_service,
    bind,
    format_address,
    server_options,
    tune_allocator,
)
from poegen.v1 import expert_pb2

logger = logging.getLogger(__name__)

_SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
SERVICE_NAME = _SERVICE.full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel options of the server (also right for clients of it: same size limits)."""
    return server_options(config.max_message_bytes, config.keepalive)


class ExpertHost:
    """One expert server: gRPC server, health, metrics, executors and the served model."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        adapter: ModelAdapter | None = None,
        expert: Expert | ServedModel | None = None,
        model_id: str = "analytic",
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.metrics_port: int | None = None
        # the experts compute here, with the torch thread count of the thread that built the host
        self._calls = worker_pool(config.workers, "poegen-call")
        self._loads = worker_pool(2, "poegen-load")
        self.handles = HandleTable(config.max_handles, config.handle_ttl_s)
        self.health = health.aio.HealthServicer()
        self.models = ModelManager(
            adapter=adapter,
            executor=self._loads,
            model_root=config.model_root,
            allowlist=config.allowlist,
            on_swap=self._swapped,
        )
        if expert is not None:
            served = expert if isinstance(expert, ServedModel) else ServedModel(expert)
            self._record_swap(self.models.install(served, model_id))
        self._reader = SharedMemoryReader() if config.shared_memory else None
        limits = WireLimits(
            config.max_message_bytes,
            shared_memory=self._reader,
            admin_token=config.admin_token.get_secret_value() if config.admin_token else None,
        )
        self.batcher = (
            DynamicBatcher(config.batch_delay_ms / 1000, self._calls, self.metrics)
            if config.batch_delay_ms > 0
            else None
        )
        serving = ExpertServing(
            self.handles,
            self._calls,
            self.metrics,
            max_message_bytes=config.max_message_bytes,
            batcher=self.batcher,
        )
        chain: list[grpc.aio.ServerInterceptor] = [
            *tracing.server_interceptors(config.tracing),
            MetricsInterceptor(self.metrics),
        ]
        if config.token is not None:
            chain.append(TokenInterceptor(config.token.get_secret_value()))
        # the caller's run innermost, after metrics and the token check (tests inject faults)
        chain.extend(interceptors)
        self.server = grpc.aio.server(interceptors=chain, options=grpc_options(config))
        servicer = ExpertServicer(self.models, serving, limits)
        inflight_bytes = config.max_inflight_bytes or 2 * config.max_message_bytes
        self.inflight = InflightLimit(config.max_inflight_calls, inflight_bytes)
        add_service(self.server, servicer, _SERVICE, parser=parser, limit=self.inflight)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind()

    def _bind(self) -> int:
        try:
            return bind(self.server, self.config.host, self.config.port, self.config.tls)
        except ValueError:
            self._shutdown_executors()
            raise

    async def start(self) -> None:
        """Start serving; health is SERVING once a model is loaded."""
        await self.server.start()
        await self._set_health(_SERVING if self.models.current is not None else _NOT_SERVING)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(
                self.config.metrics_host, self.config.metrics_port
            )
        logger.info("expert server on %s", format_address(self.config.host, self.port))

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight calls ``grace`` seconds."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        await self.server.stop(grace)
        if self.batcher is not None:
            await self.batcher.close()
        await self.models.close()
        self._shutdown_executors()
        self.metrics.close()
        if self._reader is not None:
            self._reader.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)

    def _shutdown_executors(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._loads.shutdown(wait=False, cancel_futures=True)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _record_swap(self, model: LoadedModel) -> None:
        self.handles.retire(model.revision)
        self.metrics.handles.set(len(self.handles))
        self.metrics.model_swapped(model.model_id, model.revision)

    async def _swapped(self, model: LoadedModel) -> None:
        self._record_swap(model)
        await self._set_health(_SERVING)


def create_server(
    config: ServerConfig,
    *,
    adapter: ModelAdapter | None = None,
    expert: Expert | ServedModel | None = None,
    model_id: str = "analytic",
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[ExpertHost, int]:
    """Build and bind a host; return it (not started) and its port.

    A process that hosts experts this way (not through :func:`serve`) should call
    :func:`poegen.kernel.transport.tune_allocator` in its entry point, as ``serve`` does: the
    experts compute in worker threads, whose glibc arenas otherwise hand large activations
    fresh pages on every call (a FLUX step with 1024 image tokens: 14 % slower there than in
    the main thread, 0 % once tuned).

    Args:
        config: the host's settings; ``port=0`` binds a free port.
        adapter: loads models for ``LoadModel``; ``None``: LoadModel is refused.
        expert: an Expert (or ServedModel) to serve from the start; ``None``: every model
            RPC answers UNAVAILABLE until a ``LoadModel`` succeeds.
        model_id: the id Describe reports for ``expert``.
        interceptors: more server interceptors, run after the built-in ones (metrics, token):
            the tests inject faults this way (``tests/helpers/faults.py``).
    """
    host = ExpertHost(
        config, adapter=adapter, expert=expert, model_id=model_id, interceptors=interceptors
    )
    return host, host.port


async def serve(
    config: ServerConfig,
    *,
    adapter: ModelAdapter | None = None,
    expert: Expert | ServedModel | None = None,
    model_id: str = "analytic",
    name: str = "expert",
    announce: Callable[[str], None] | None = None,
) -> int:
    """Run a host until SIGTERM or SIGINT, then drain it; return the exit status (0).

    A process entry point: it also tunes the allocator for large messages
    (:func:`poegen.kernel.transport.tune_allocator`).

    ``announce`` receives ``"poegen: serving <name> on <host>:<port>"`` once the server
    listens (and ``"poegen: metrics on <host>:<port>"`` when metrics are on).
    """
    tune_allocator()  # a process entry point: see poegen.kernel.transport
    host, port = create_server(config, adapter=adapter, expert=expert, model_id=model_id)
    await host.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if announce is not None:
            announce(f"poegen: serving {name} on {format_address(config.host, port)}")
            if host.metrics_port is not None:
                announce(
                    f"poegen: metrics on {format_address(config.metrics_host, host.metrics_port)}"
                )
        await stop.wait()
        logger.info("shutting down: draining in-flight calls for up to %.1f s", config.grace_s)
        await host.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
