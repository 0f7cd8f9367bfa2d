"""One poegen expert as a Ray Serve deployment behind Serve's gRPC proxy.

The deployment answers ``poegen.v1.ExpertService`` unchanged: Serve's proxy parses each request
with the generated message class, routes it to a replica's method of the same name, and sends
back the bytes of what the method returns. Each replica wires the expert host's own parts —
:class:`~poegen.expert_servers.server.models.ModelManager` (model ids, hot swap),
:class:`~poegen.expert_servers.server.serving.ExpertServing` (validated calls in worker
threads) and :class:`~poegen.expert_servers.server.service.ExpertServicer` (proto ↔ tensors) —
as :class:`~poegen.expert_servers.server.server.ExpertHost` does, minus the gRPC server, which
is Serve's. So the same :class:`~poegen.kernel.remote.RemoteExpert` talks to it, and a reply
carries the same bits as a ``poegen serve`` of the same model.

What maps to what:

* the model: ``user_config`` ``{model: <id under model_root>, options: {k: v}}``; Serve calls
  :meth:`ExpertReplica.reconfigure` with it before the replica takes traffic and again, in place,
  whenever the deployed ``user_config`` changes: that is the hot swap (the host's ``LoadModel``
  path: in-flight calls finish on the old model, replies report the new revision);
* replicas: ``num_replicas`` or ``autoscaling_config`` (Serve scales on ongoing requests per
  replica, ``target_ongoing_requests``); every replica loads the model itself, and its
  revisions name it (``<replica instance>.<n>``);
* variants: a call whose metadata carries ``multiplexed_model_id: <id under model_root>`` is
  answered by that model (loaded with the deployment's options, at most
  :data:`VARIANTS_PER_REPLICA` per replica, least recently used evicted; Serve routes calls of
  one id to replicas that hold it); without it, by the ``user_config`` model;
* errors: a refused call ends with the servicer's status code, message (``"<field>: <reason>"``)
  and ``google.rpc.BadRequest`` trailer, as from the host. A refused ``LoadModel`` stream keeps
  the code and the message only (Serve carries no trailers for a failed stream);
* the bearer token: from the replica's environment, :data:`TOKEN_ENV` (every RPC but health
  needs ``authorization: Bearer <token>``; UNAUTHENTICATED otherwise); the admin token of
  ``LoadModel`` from :data:`ADMIN_TOKEN_ENV`. ``LoadModel`` swaps only the replica it reaches:
  swap a deployment with ``user_config``;
* health: ``grpc.health.v1.Health/Check`` (SERVING once the model is loaded); the proxy's own
  ``ray.serve.RayServeAPIService/Healthz`` needs no application. ``Health/Watch`` is not served.

Build it with :func:`build_app` (the ``import_path`` of ``deploy/ray/config.yaml``); Serve's
proxy needs :data:`GRPC_SERVICER_FUNCTIONS` in its ``grpc_options``. References: Ray Serve's
gRPC guide (``grpc_servicer_functions``, ``RayServegRPCContext``), model multiplexing
(``@serve.multiplexed``, ``serve.get_multiplexed_model_id``) and ``reconfigure``/``user_config``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from poegen.expert_servers.server.backends import create_adapter
from poegen.expert_servers.server.config import (
    ConfigError,
    ServerConfig,
    format_validation_error,
    parse_server_config,
)
from poegen.expert_servers.server.handles import HandleTable
from poegen.expert_servers.server.metrics import ServerMetrics
from poegen.expert_servers.server.models import LoadedModel, ModelManager
from poegen.expert_servers.server.service import ExpertServicer, WireLimits
from poegen.expert_servers.server.serving import ExpertServing
from poegen.kernel.calls import worker_pool
from poegen.kernel.codec import Serialized
from poegen.kernel.errors import ExpertError, to_status
from poegen.kernel.transport import AUTHORIZATION, metadata_value, same_secret
from poegen.v1 import expert_pb2

# (after poegen: ruff reads this folder, deploy/ray, as part of the ray package)
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

logger = logging.getLogger(__name__)

GRPC_SERVICER_FUNCTIONS = (
    "poegen.v1.expert_pb2_grpc.add_ExpertServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
"""What Serve's ``grpc_options.grpc_servicer_functions`` must list for this app."""
TOKEN_ENV = "POEGEN_TOKEN"
"""Environment variable of the replicas holding the bearer token (unset: no token)."""
ADMIN_TOKEN_ENV = "POEGEN_ADMIN_TOKEN"
"""Environment variable of the replicas holding ``LoadModel``'s admin token (unset: off)."""
VARIANTS_PER_REPLICA = 4
"""Multiplexed variants one replica keeps loaded (Serve evicts the least recently used)."""
MULTIPLEXED_MODEL_ID = "multiplexed_model_id"
"""The call metadata key naming a variant (Serve's own)."""

_SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
_EMPTY = Serialized(b"")  # the body of a refused unary call: the status says it all
# ServerConfig fields that mean something here; the rest (bind address, TLS, in-flight limits,
# metrics port, shared memory) belong to Serve's proxy or cannot cross it
_SERVER_FIELDS = frozenset(
    {"model_root", "allowlist", "max_message_bytes", "max_handles", "handle_ttl_s", "workers"}
)


class AppArgs(BaseModel):
    """The ``args`` of :func:`build_app`: fixed for the deployment (a change restarts it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(min_length=1, description="entry point of group poegen.backends")
    server: dict[str, Any] = Field(
        default_factory=dict,
        description=f"ServerConfig fields: {', '.join(sorted(_SERVER_FIELDS))}",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica")


class ModelChoice(BaseModel):
    """The ``user_config``: the model served, swapped in place by ``reconfigure``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="model id under model_root (or allowlisted)")
    options: dict[str, str] = Field(default_factory=dict, description="adapter load options")


def server_config(settings: Mapping[str, Any]) -> ServerConfig:
    """The host settings a replica uses; ``ConfigError`` naming ``server.<field>`` otherwise."""
    unknown = sorted(set(settings) - _SERVER_FIELDS)
    if unknown:
        raise ConfigError(
            f"server.{unknown[0]}: not used on Ray Serve (allowed: {', '.join(sorted(_SERVER_FIELDS))})"
        )
    return parse_server_config(settings)


def _validated(model: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix)) from None


@dataclass(frozen=True, slots=True)
class _Served:
    """One served model's state: its manager (swaps) and the servicer answering for it."""

    models: ModelManager
    servicer: ExpertServicer


class _ServeContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses, over Serve's context.

    Serve's context has no ``abort``: the status goes on it (code, message and the
    ``grpc-status-details-bin`` BadRequest trailer), and ``grpc.aio.AbortError`` ends the
    servicer method as a real abort would; :class:`ExpertReplica` then returns an empty body.
    """

    def __init__(self, context: RayServegRPCContext) -> None:
        self._context = context

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._context.invocation_metadata()

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.fail(status)
        raise grpc.aio.AbortError()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise grpc.aio.AbortError()

    def fail(self, status: grpc.Status) -> None:
        self._context.set_code(status.code)
        self._context.set_details(status.details)
        self._context.set_trailing_metadata(list(status.trailing_metadata or ()))


class ExpertReplica:
    """One replica of an expert deployment (see the module docstring).

    Args:
        backend: the model adapter (``analytic``, ``flow``, ``flux``, …).
        server: host settings (:data:`_SERVER_FIELDS` of
            :class:`~poegen.expert_servers.server.config.ServerConfig`).
        torch_threads: torch's intra-op threads in this replica; ``None`` keeps Ray's
            (``OMP_NUM_THREADS`` = the replica's ``num_cpus``).
    """

    def __init__(
        self,
        backend: str,
        server: Mapping[str, Any] | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # before the pools: their threads copy it
        token, admin = os.environ.get(TOKEN_ENV) or None, os.environ.get(ADMIN_TOKEN_ENV) or None
        self._config = server_config(server or {})
        self._backend = backend
        self._expected = f"Bearer {token}" if token else None
        self._admin_token = admin
        self._calls = worker_pool(self._config.workers, "poegen-call")
        self._loads = worker_pool(2, "poegen-load")
        self._choice: ModelChoice | None = None
        self._base = self._served()

    def _served(self) -> _Served:
        """A model manager and servicer wired as ``ExpertHost`` wires them."""
        config = self._config
        handles = HandleTable(config.max_handles, config.handle_ttl_s)
        metrics = ServerMetrics()

        async def swapped(model: LoadedModel) -> None:
            # a swapped-out model's handles answer FAILED_PRECONDITION, as on the host
            handles.retire(model.revision)
            metrics.model_swapped(model.model_id, model.revision)

        models = ModelManager(
            adapter=create_adapter(self._backend),
            executor=self._loads,
            model_root=config.model_root,
            allowlist=config.allowlist,
            on_swap=swapped,
        )
        serving = ExpertServing(
            handles, self._calls, metrics, max_message_bytes=config.max_message_bytes
        )
        limits = WireLimits(config.max_message_bytes, admin_token=self._admin_token)
        return _Served(models, ExpertServicer(models, serving, limits))

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Serve's hook for ``user_config``: load that model and swap it in (the hot swap).

        The first model must load: its error fails the replica, and so the deploy (Serve
        retries, then DEPLOY_FAILED). A later model that fails to load is logged, and the
        served model keeps answering, as on the host: raising here would make Serve kill this
        replica and its retries, which leaves no replica at all (measured: a config naming a
        missing model took the application down, UNAVAILABLE).
        """
        try:
            choice = _validated(ModelChoice, dict(user_config), "user_config")
            async for event in self._base.models.load(choice.model, choice.options):
                logger.info("load %s: %3.0f%% %s", event.stage, 100 * event.progress, event.message)
        except (ConfigError, ExpertError) as err:
            serving = self._base.models.current
            if serving is None:
                raise
            logger.error(
                "user_config not applied (%s); still serving %r revision %s",
                err,
                serving.model_id,
                serving.revision,
            )
            return
        self._choice = choice

    @serve.multiplexed(max_num_models_per_replica=VARIANTS_PER_REPLICA)
    async def variant(self, model_id: str) -> _Served:
        """The variant ``model_id`` (Serve keeps the loaded ones per replica, LRU)."""
        served = self._served()
        options = self._choice.options if self._choice is not None else {}
        async for _ in served.models.load(model_id, options):
            pass
        return served

    async def _target(self, context: RayServegRPCContext, *, health: bool = False) -> _Served:
        """The model answering this call: the token checked, the variant it names loaded."""
        if not health and self._expected is not None:
            given = metadata_value(context.invocation_metadata(), AUTHORIZATION)
            if not same_secret(given, self._expected):
                raise ExpertError.unauthenticated()
        model_id = serve.get_multiplexed_model_id()
        return await self.variant(model_id) if model_id else self._base

    async def unary(self, method: str, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Answer the unary RPC ``method`` with the servicer's method of that name."""
        context = _ServeContext(grpc_context)
        try:
            served = await self._target(grpc_context)
        except ExpertError as err:
            context.fail(to_status(err))
            return _EMPTY
        try:
            return await getattr(served.servicer, method)(request, context)
        except grpc.aio.AbortError:
            return _EMPTY  # the status is on the context (_ServeContext)

    async def LoadModel(
        self, request: expert_pb2.LoadModelRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[expert_pb2.LoadModelResponse]:
        context = _ServeContext(grpc_context)
        try:
            served = await self._target(grpc_context)
            async for reply in served.servicer.LoadModel(request, context):
                yield reply
        except ExpertError as err:
            context.fail(to_status(err))
            raise _Refused(str(err)) from None
        except grpc.aio.AbortError:
            # Serve sends a stream's context only with a message: a failed stream keeps its code
            # and message through the exception (gRPCStatusError), not its trailers
            raise _Refused(grpc_context.details()) from None

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """``grpc.health.v1`` Check: SERVING once this replica serves its model."""
        if request.service not in ("", _SERVICE.full_name):
            _ServeContext(grpc_context).fail(
                to_status(ExpertError.not_found("service", f"unknown service {request.service!r}"))
            )
            return health_pb2.HealthCheckResponse()
        served = await self._target(grpc_context, health=True)
        ready = served.models.current is not None
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def __del__(self) -> None:
        for pool in (getattr(self, "_calls", None), getattr(self, "_loads", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class _Refused(Exception):
    """A refused stream; its status is already on the call's context."""


def _unary_rpc(method: str) -> Callable[..., Any]:
    async def rpc(self: ExpertReplica, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self.unary(method, request, grpc_context)

    rpc.__name__ = rpc.__qualname__ = method
    rpc.__doc__ = f"``{_SERVICE.full_name}/{method}``, answered by the servicer."
    return rpc


# one method per unary RPC of the proto, so an RPC added there is served here too
for _method in _SERVICE.methods:
    if not (_method.client_streaming or _method.server_streaming):
        setattr(ExpertReplica, _method.name, _unary_rpc(_method.name))

ExpertDeployment = serve.deployment(ExpertReplica, name="Expert")


def build_app(args: Mapping[str, Any]) -> Application:
    """The application of one expert: ``serve run`` calls it with the config's ``args``.

    ``args``: :class:`AppArgs` (``backend``, ``server``, ``torch_threads``). Validated here,
    so a bad config fails at deploy time with a ``ConfigError`` naming the field.
    """
    spec = _validated(AppArgs, dict(args), "args")
    # model_root is checked by the replicas: it names a folder on their nodes, not here
    server_config({k: v for k, v in spec.server.items() if k != "model_root"})
    return ExpertDeployment.bind(spec.backend, spec.server, spec.torch_threads)


__all__ = [
    "ADMIN_TOKEN_ENV",
    "GRPC_SERVICER_FUNCTIONS",
    "MULTIPLEXED_MODEL_ID",
    "TOKEN_ENV",
    "VARIANTS_PER_REPLICA",
    "AppArgs",
    "ExpertDeployment",
    "ExpertReplica",
    "ModelChoice",
    "build_app",
    "server_config",
]
