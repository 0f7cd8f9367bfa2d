"""Configuration of the expert host, validated with pydantic v2 (an edge: YAML and the CLI).

A YAML file for ``poegen serve`` holds the host settings under ``server:``::

    server:
      host: 127.0.0.1            # bind address; 127.0.0.1 unless told otherwise
      port: 0                    # 0 picks a free port (the CLI prints it)
      max_message_bytes: 536870912
      grace_s: 30                # in-flight calls get this long on SIGTERM
      keepalive: {time_s: 60, timeout_s: 20, permit_without_calls: true}
      tls: {cert_file: server.pem, key_file: server.key, client_ca_file: ca.pem}
      model_root: /models        # LoadModel ids are paths under it ...
      allowlist: [org/model]     # ... or exactly one of these
      max_handles: 1024          # condition handles kept (LRU) ...
      handle_ttl_s: 3600         # ... and for how long after their last use
      shared_memory: false       # shared-memory tensors with co-located peers (both ways)
      metrics_port: 9464         # Prometheus /metrics over HTTP; absent: no endpoint
      batch_delay_ms: 0          # > 0: merge concurrent calls (see server.batching); 0: off

Tokens (``token``, the bearer token every RPC but health needs; ``admin_token``, which
``LoadModel`` needs in addition) are better given through the environment
(``POEGEN_TOKEN``, ``POEGEN_ADMIN_TOKEN``, read by the CLI) than written in a file.

Every invalid value raises :class:`ConfigError` naming the field, e.g.
``server.port: Input should be less than or equal to 65535``.

:class:`KeepaliveConfig`, :class:`TLSConfig` and :data:`DEFAULT_MAX_MESSAGE_BYTES` live in
:mod:`poegen.kernel.transport` (the sampler service shares them); they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from poegen.kernel import tracing
from poegen.kernel.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_GRPC_LIMIT,
    KeepaliveConfig,
    TLSConfig,
)

# largest config file read, so a wrong path cannot make the server read a huge file
_MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


class ServerConfig(BaseModel):
    """Settings of one expert host (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="bind address")
    port: int = Field(0, ge=0, le=65535, description="bind port; 0 picks a free one")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=MAX_GRPC_LIMIT, description="largest message"
    )
    keepalive: KeepaliveConfig = Field(default_factory=KeepaliveConfig)
    grace_s: float = Field(30.0, ge=0, description="drain time for in-flight calls on shutdown")
    tls: TLSConfig | None = None
    token: SecretStr | None = Field(None, description="bearer token every RPC but health needs")
    admin_token: SecretStr | None = Field(None, description="token LoadModel needs; unset: off")
    model_root: Path | None = Field(None, description="LoadModel ids are paths under it")
    allowlist: tuple[str, ...] = Field((), description="ids LoadModel accepts verbatim")
    max_handles: int = Field(1024, ge=1, description="condition handles kept (LRU)")
    handle_ttl_s: float = Field(3600.0, gt=0, description="handle lifetime after its last use")
    shared_memory: bool = Field(
        False, description="accept shared-memory tensors; write replies into rooms offered"
    )
    workers: int = Field(4, ge=1, le=256, description="threads running model calls")
    tracing: bool = Field(False, description="OpenTelemetry spans for every RPC (kernel.tracing)")
    max_inflight_calls: int = Field(
        64, ge=1, le=65536, description="calls in flight at once; beyond: RESOURCE_EXHAUSTED"
    )
    max_inflight_bytes: int | None = Field(
        None,
        ge=1024,
        description="request bytes in flight at once (default: twice max_message_bytes); "
        "beyond: RESOURCE_EXHAUSTED",
    )
    metrics_host: str = Field("127.0.0.1", min_length=1, description="bind address of /metrics")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="/metrics port; 0: free")
    batch_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="dynamic batching: merge concurrent Velocity/LogProb/Score calls that can "
        "share a forward pass; the longest a call waits for others once its key is idle "
        "(server.batching); 0: off",
    )

    @model_validator(mode="after")
    def _check_tokens(self) -> ServerConfig:
        for name in ("token", "admin_token"):
            secret = getattr(self, name)
            if secret is not None and not secret.get_secret_value():
                raise ValueError(f"{name}: must not be empty")
        if (
            self.token is not None
            and self.admin_token is not None
            and self.token.get_secret_value() == self.admin_token.get_secret_value()
        ):
            raise ValueError("admin_token: must differ from token")
        tracing.check(self.tracing)
        if self.max_inflight_bytes is None:
            object.__setattr__(self, "max_inflight_bytes", 2 * self.max_message_bytes)
        elif self.max_inflight_bytes < self.max_message_bytes:
            raise ValueError("max_inflight_bytes: must be at least max_message_bytes")
        if self.model_root is not None and not self.model_root.is_dir():
            raise ValueError("model_root: not a directory")
        return self


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming its field: ``server.port: <message>``."""
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        lines.append(f"{loc or prefix or 'config'}: {item['msg']}")
    return "; ".join(lines)


def parse_server_config(data: Mapping[str, Any] | None, *, prefix: str = "server") -> ServerConfig:
    """Validate a mapping (a YAML section) into a :class:`ServerConfig`."""
    try:
        return ServerConfig.model_validate(dict(data or {}))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix)) from None


def read_yaml(path: Path | str, *, field: str = "config") -> dict[str, Any]:
    """Read a YAML mapping (safe loader only), at most 1 MiB."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{field}: larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{field}: not valid YAML ({e.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: must be a YAML mapping, got {type(data).__name__}")
    return data


def load_server_config(path: Path | str) -> ServerConfig:
    """Read the ``server:`` section of a YAML file."""
    return parse_server_config(read_yaml(path).get("server"))


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ConfigError",
    "KeepaliveConfig",
    "ServerConfig",
    "TLSConfig",
    "format_validation_error",
    "load_server_config",
    "parse_server_config",
    "read_yaml",
]
