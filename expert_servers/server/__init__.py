"""The generic expert host: serves any Expert over gRPC (``poegen.v1.ExpertService``).

Modules: ``server`` (:func:`create_server`, :func:`serve`, :class:`ExpertHost`), ``config``
(pydantic settings from YAML), ``adapter`` (the :class:`ModelAdapter` interface),
``models`` (model ids, hot swap), ``handles`` (condition handles), ``serving`` (validated
calls off the event loop), ``service`` (the thin servicer), ``interceptors`` (token, metrics),
``metrics`` (Prometheus), ``expert_file`` (experts described by YAML), ``cli`` (``poegen serve``).
"""

import importlib
from typing import Any

from poegen.expert_servers.server.adapter import (
    Autoencoder,
    Condition,
    Conditionable,
    ModelAdapter,
    ModelRef,
    ServedModel,
)

# The host's names load on first use (PEP 562): a model adapter imports ``.adapter`` through
# this package, and must not pull in gRPC with it (tests/kernel/test_layers.py).
_HOST_NAMES = {
    "ConfigError": "config",
    "ServerConfig": "config",
    "load_server_config": "config",
    "ExpertFileAdapter": "expert_file",
    "load_expert_file": "expert_file",
    "ExpertHost": "server",
    "create_server": "server",
    "grpc_options": "server",
    "serve": "server",
}


def __getattr__(name: str) -> Any:
    module = _HOST_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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
