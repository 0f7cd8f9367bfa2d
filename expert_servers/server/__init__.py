"""The generic expert host: serves any Expert over gRPC (``poegen.v1.ExpertService``).

Modules: ``server`` (:func:`create_server`, :func:`serve`, :class:`ExpertHost`), ``config``
(pydantic settings from YAML), ``adapter`` (the :class:`ModelAdapter` interface),
``models`` (model ids, hot swap), ``handles`` (condition handles), ``serving`` (validated
calls off the event loop), ``service`` (the thin servicer), ``interceptors`` (token, metrics),
``metrics`` (Prometheus), ``expert_file`` (experts described by YAML), ``cli`` (``poegen serve``).
"""

from poegen.expert_servers.server.adapter import (
    Autoencoder,
    Condition,
    Conditionable,
    ModelAdapter,
    ModelRef,
    ServedModel,
)
from poegen.expert_servers.server.config import ConfigError, ServerConfig, load_server_config
from poegen.expert_servers.server.expert_file import ExpertFileAdapter, load_expert_file
from poegen.expert_servers.server.server import ExpertHost, create_server, grpc_options, serve

__all__ = [
    "Autoencoder",
    "Condition",
    "Conditionable",
    "ConfigError",
    "ExpertFileAdapter",
    "ExpertHost",
    "ModelAdapter",
    "ModelRef",
    "ServedModel",
    "ServerConfig",
    "create_server",
    "grpc_options",
    "load_expert_file",
    "load_server_config",
    "serve",
]
