"""Small blocking calls on one endpoint: health, describe, swap (``LoadModel``).

These back ``poegen health``, ``poegen describe`` and ``poegen swap`` and the SDK's
``Client.describe``/``Client.swap``::

    health("127.0.0.1:50051")                       # "SERVING", "NOT_SERVING", "UNREACHABLE", …
    info = describe("127.0.0.1:50051")              # an EndpointInfo
    for event in swap("127.0.0.1:50051", "flux-2.yaml", admin_token="…"):
        print(event.stage, event.progress, event.message)

Errors: :class:`~poegen.clients.errors.ConnectionFailed` when nothing answers;
:class:`~poegen.clients.errors.GenerationError` carrying the server's code and field for a
refused call (a ``LoadModel`` of an id outside the model root: INVALID_ARGUMENT on
``model_id``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poegen.clients.errors import ConnectionFailed, GenerationError
from poegen.kernel.errors import from_rpc_error, grpc_code
from poegen.kernel.remote import describe_to_info
from poegen.kernel.transport import bearer_metadata, channel_credentials
from poegen.v1 import expert_pb2, expert_pb2_grpc

ADMIN_METADATA = "x-poegen-admin-token"
_STAGES = {
    expert_pb2.LOAD_STAGE_QUEUED: "queued",
    expert_pb2.LOAD_STAGE_LOADING: "loading",
    expert_pb2.LOAD_STAGE_READY: "ready",
}


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What ``Describe`` says, in plain fields (``kind``/``capabilities`` as strings)."""

    address: str
    name: str
    kind: str
    capabilities: tuple[str, ...]
    sample_shape: tuple[int, ...] | None
    max_batch: int | None
    model_id: str
    revision: str
    latent_space: str
    pixel_input: bool
    max_message_bytes: int
    shared_memory: bool


@dataclass(frozen=True, slots=True)
class SwapEvent:
    """Progress of a ``LoadModel``: stage (queued, loading, ready), fraction, message."""

    stage: str
    progress: float
    message: str
    revision: str


def rpc_failure(e: grpc.RpcError, address: str, what: str) -> Exception:
    """The SDK error of a failed call to ``address``."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    err = from_rpc_error(e)
    if err is not None:
        return GenerationError(
            grpc_code(err.code), err.field, err.reason, where=f"{what} at {address}"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ConnectionFailed(f"{what} at {address} is unreachable ({_details(e)})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectionFailed(f"{what} at {address} did not answer in time")
    return GenerationError(code, "", _details(e), where=f"{what} at {address}")


def _details(e: grpc.RpcError) -> str:
    details = e.details() if callable(getattr(e, "details", None)) else ""
    return (details or str(e)).splitlines()[0][:300]


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS of a client's channels: trust ``ca_file`` (None: the system roots) and, for mTLS,
    present ``cert_file`` with ``key_file``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: cert_file and key_file go together (mTLS)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    @classmethod
    def from_env(cls, prefix: str = "POEGEN") -> ClientTLS | None:
        """``<prefix>_CA_FILE``, ``<prefix>_CERT_FILE``, ``<prefix>_KEY_FILE``; None if unset."""
        files = {
            k: os.environ.get(f"{prefix}_{k.upper()}") for k in ("ca_file", "cert_file", "key_file")
        }
        if not any(files.values()):
            return None
        return cls(**{k: Path(v) if v else None for k, v in files.items()})


def open_channel(
    address: str, tls: ClientTLS | None = None, options: list | None = None
) -> grpc.Channel:
    """A blocking channel to ``address``: TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def health(
    address: str, *, service: str = "", timeout: float = 3.0, tls: ClientTLS | None = None
) -> str:
    """``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN`` or ``UNREACHABLE``."""
    with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def describe(
    address: str,
    *,
    token: str | None = None,
    timeout: float = 10.0,
    tls: ClientTLS | None = None,
) -> EndpointInfo:
    """``Describe`` of the expert at ``address``."""
    with open_channel(address, tls) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        try:
            reply = stub.Describe(
                expert_pb2.DescribeRequest(), metadata=bearer_metadata(token), timeout=timeout
            )
        except grpc.RpcError as e:
            raise rpc_failure(e, address, "expert") from None
    info = describe_to_info(reply)
    return EndpointInfo(
        address=address,
        name=info.name,
        kind=str(info.kind),
        capabilities=tuple(sorted(str(c) for c in info.capabilities)),
        sample_shape=info.sample_shape,
        max_batch=info.max_batch,
        model_id=info.model_id,
        revision=info.revision,
        latent_space=info.latent_space,
        pixel_input=bool(getattr(reply, "pixel_input", False)),
        max_message_bytes=int(reply.max_message_bytes),
        shared_memory=bool(reply.shared_memory),
    )


def swap(
    address: str,
    model_id: str,
    options: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
    admin_token: str | None = None,
    timeout: float | None = None,
    tls: ClientTLS | None = None,
) -> Iterator[SwapEvent]:
    """Stream the ``LoadModel`` of ``model_id`` at ``address`` (ends with stage ``ready``)."""
    metadata = list(bearer_metadata(token))
    if admin_token:
        metadata.append((ADMIN_METADATA, admin_token))
    with open_channel(address, tls) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        request = expert_pb2.LoadModelRequest(model_id=model_id, options=dict(options or {}))
        call = stub.LoadModel(request, metadata=metadata, timeout=timeout)
        try:
            for reply in call:
                yield SwapEvent(
                    _STAGES.get(reply.stage, "unspecified"),
                    reply.progress,
                    reply.message,
                    reply.revision,
                )
        except grpc.RpcError as e:
            raise rpc_failure(e, address, "expert") from None
        finally:
            call.cancel()


__all__ = [
    "ADMIN_METADATA",
    "EndpointInfo",
    "SwapEvent",
    "describe",
    "health",
    "rpc_failure",
    "swap",
]
