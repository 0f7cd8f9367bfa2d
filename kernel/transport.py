"""gRPC plumbing shared by poegen's servers and clients: options, TLS, bearer tokens, stubs.

The expert host (:mod:`poegen.expert_servers.server`), the sampler service
(:mod:`poegen.kernel.service`) and the kernel's client (:mod:`poegen.kernel.remote`) all build
their channels and servers from this module, so the three agree on message limits, keepalive,
credentials and tokens. It imports grpc, pydantic and the generated proto code only.

Server side::

    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)], options=server_options(max_bytes, keepalive)
    )
    add_service(server, servicer, expert_pb2.DESCRIPTOR.services_by_name["ExpertService"])
    port = bind(server, "127.0.0.1", 0, tls)           # TLSConfig or None; ValueError if busy

Client side::

    channel = grpc.insecure_channel(address, options=channel_options(max_bytes))
    rpcs = unary_methods(channel, expert_pb2.DESCRIPTOR.services_by_name["ExpertService"])
    reply = rpcs["Describe"](DescribeRequest(), metadata=bearer_metadata(token))

* **Message size**: :data:`DEFAULT_MAX_MESSAGE_BYTES` (512 MiB) on both ends unless configured;
  gRPC keeps the limit in a C int (at most :data:`MAX_GRPC_LIMIT`).
* **Keepalive** (:class:`KeepaliveConfig`): the server pings idle connections and accepts the
  clients' pings no more often than ``min_ping_interval_s``.
* **TLS** (:class:`TLSConfig`): a server certificate, plus a client CA for mTLS;
  :func:`channel_credentials` is the client's side (roots, and a client certificate for mTLS).
* **Bearer token**: clients send ``authorization: Bearer <token>`` (:func:`bearer_metadata`);
  :class:`TokenInterceptor` refuses every RPC without it (UNAUTHENTICATED) except the standard
  health service, which Kubernetes probes call without credentials. Comparisons take constant
  time in the length of the expected token.
* **Allocator** (:func:`tune_allocator`, entry points only): large messages are built and
  freed at every call, and glibc returns freed multi-MiB buffers to the OS, so each call
  page-faults its buffers in again (about 3 µs per 4 KiB page on a VM: 6 ms per 8 MiB
  buffer, several buffers per call). The same holds for a model's activations in a worker
  thread (its own glibc arena): a FLUX step with 1024 image tokens in the expert host's worker
  was 14 % slower than in the main thread untuned, equal once tuned. Raising the mmap and trim
  thresholds keeps them in the heap; ``poegen serve``, the sampler service and the benchmarks
  that host experts call it at start.
* **Serialisation**: :func:`add_service` and :func:`unary_methods` register the services with
  a serializer that calls ``SerializeToString()`` on whatever the servicer returns or the
  client sends, so that a :class:`poegen.kernel.codec.WireMessage` (a message whose tensor
  bytes are appended straight from the tensor's memory, one copy) can stand in for a proto
  message. Proto messages go through unchanged; the wire format is the same.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import operator
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from poegen.kernel.errors import ExpertError, abort

logger = logging.getLogger(__name__)

#: Largest message sent and received unless configured (both ends use it).
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20
#: gRPC keeps message limits in a C int.
MAX_GRPC_LIMIT = (1 << 31) - 1
#: Metadata key of the bearer token.
AUTHORIZATION = "authorization"
#: Methods under this prefix (the standard health service) need no token.
HEALTH_PREFIX = "/grpc.health.v1.Health/"

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
#: Serializer of every poegen RPC: proto messages and codec.WireMessage alike.
serialize = operator.methodcaller("SerializeToString")


# --------------------------------------------------------------------------- configuration


class KeepaliveConfig(BaseModel):
    """HTTP/2 keepalive of the server's connections."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_s: float = Field(60.0, gt=0, description="ping an idle connection after this long")
    timeout_s: float = Field(20.0, gt=0, description="close it if the ping is not answered")
    permit_without_calls: bool = Field(True, description="allow client pings with no call open")
    min_ping_interval_s: float = Field(10.0, gt=0, description="shortest client ping interval")


class TLSConfig(BaseModel):
    """Server certificate, and a client CA to require client certificates (mTLS)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: Path = Field(description="PEM certificate chain of the server")
    key_file: Path = Field(description="PEM private key of the server")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed"
    )

    @model_validator(mode="after")
    def _files_exist(self) -> TLSConfig:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: not a readable file")
        return self


def server_options(max_message_bytes: int, keepalive: KeepaliveConfig) -> list[tuple[str, int]]:
    """Options of a poegen gRPC server: message limits, keepalive, a port of its own."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            int(keepalive.min_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_pings_without_data", 0),
        # never share a port with another process (port 0 must mean a port of our own)
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of a poegen client channel: message limits, quick reconnects."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC's own reconnect backoff starts at 1 s; the callers' retry policies pace retries
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def server_credentials(tls: TLSConfig | None) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (mTLS when ``tls.client_ca_file`` is set); None: plaintext."""
    if tls is None:
        return None
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca_file: Path | None = None, *, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials of a client: trust ``ca_file`` (None: the system roots) and, for mTLS,
    present ``cert_file`` / ``key_file`` (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file: cert_file and key_file go together (mTLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file is not None else None,
        private_key=key_file.read_bytes() if key_file is not None else None,
        certificate_chain=cert_file.read_bytes() if cert_file is not None else None,
    )


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind(server: grpc.aio.Server, host: str, port: int, tls: TLSConfig | None) -> int:
    """Bind ``server`` to ``host:port`` (TLS when given); the port bound, ValueError if none."""
    address = format_address(host, port)
    credentials = server_credentials(tls)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ValueError(f"port: cannot bind {address}")
    return bound


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def tune_allocator(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed buffers of up to ``mmap_threshold`` bytes in the heap (glibc only).

    Process-wide, like logging configuration: call it from entry points only (a server's
    ``main``, a benchmark), never from a library. Allocations under ``mmap_threshold`` come
    from the heap (glibc caps it at 32 MiB), which is returned to the OS only when more than
    ``trim_threshold`` bytes are free at its top, so at most that much freed memory stays
    resident. Returns whether the settings were applied (False on other C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    logger.debug("allocator thresholds %s", "set" if done else "unchanged (not glibc?)")
    return done


# --------------------------------------------------------------------------- services


def _from_string(message_type: Any) -> Callable[[bytes], Any]:
    return message_type.FromString


class InflightLimit:
    """At most ``max_calls`` calls and ``max_bytes`` request bytes in flight on one host;
    beyond either, a call is refused with RESOURCE_EXHAUSTED on ``request`` before it is parsed.
    (Tensors sent through shared memory count only their few wire bytes.)"""

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self.max_calls, self.max_bytes = max_calls, max_bytes
        self.calls = self.bytes = 0  # touched only on the event loop

    def acquire(self, size: int) -> None:
        if self.calls + 1 > self.max_calls:
            raise ExpertError.resource_exhausted(
                "request", f"{self.calls} calls in flight, the limit is {self.max_calls}"
            )
        if self.bytes + size > self.max_bytes:
            raise ExpertError.resource_exhausted(
                "request",
                f"{self.bytes + size} request bytes would be in flight, the limit is "
                f"{self.max_bytes}",
            )
        self.calls += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.calls -= 1
        self.bytes -= size


def add_service(
    server: grpc.aio.Server,
    servicer: Any,
    service: ServiceDescriptor,
    *,
    parser: Callable[[Any], Callable[[bytes], Any]] = _from_string,
    limit: InflightLimit | None = None,
) -> None:
    """Register ``servicer``'s methods for ``service``, replies serialised with
    ``reply.SerializeToString()`` (the generated ``add_*_to_server``, made codec-aware).

    ``parser(request_type)`` gives each method's request parser (``FromString`` by default; the
    expert host passes :func:`poegen.kernel.codec.parser`, which leaves the bytes of large
    tensors where they arrived). Requests are parsed inside the handler, not by gRPC's
    deserializer, so bytes that are no valid message end the call with INVALID_ARGUMENT on
    ``request`` (a deserializer's exception would become UNKNOWN, naming a Python class).
    With ``limit``, each call holds its share of it while it runs."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streams are not supported")
        request = message_factory.GetMessageClass(method.input_type)
        behaviour = _parsing(getattr(servicer, method.name), parser(request), method, limit)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(behaviour, response_serializer=serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _parsing(
    behaviour: Callable[..., Any],
    parse: Callable[[bytes], Any],
    method: Any,
    limit: InflightLimit | None,
) -> Any:
    """``behaviour`` called with the request ``parse`` makes of the raw bytes, holding its
    share of ``limit`` until it returns."""
    type_name = method.input_type.full_name

    async def admitted(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        if limit is not None:
            try:
                limit.acquire(len(raw))
            except ExpertError as err:
                await abort(context, err)
        try:
            return parse(raw)
        except (DecodeError, UnicodeDecodeError) as e:
            if limit is not None:
                limit.release(len(raw))
            reason = f"not a valid {type_name} message ({e})"
            await abort(context, ExpertError.invalid("request", reason))

    def release(raw: bytes) -> None:
        if limit is not None:
            limit.release(len(raw))

    if method.server_streaming:

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await admitted(raw, context)
            try:
                async for reply in behaviour(request, context):
                    yield reply
            finally:
                release(raw)

        return stream

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        request = await admitted(raw, context)
        try:
            return await behaviour(request, context)
        finally:
            release(raw)

    return unary


# --------------------------------------------------------------------------- clients


def unary_methods(
    channel: grpc.Channel,
    service: ServiceDescriptor,
    *,
    parser: Callable[[Any], Callable[[bytes], Any]] = _from_string,
) -> dict[str, grpc.UnaryUnaryMultiCallable]:
    """The unary-unary methods of ``service`` on ``channel``, by name; requests serialised with
    ``request.SerializeToString()`` (so a ``codec.WireMessage`` may be sent), replies parsed
    with ``parser(reply_type)`` (``FromString`` by default)."""
    methods = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue
        reply = message_factory.GetMessageClass(method.output_type)
        methods[method.name] = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=serialize,
            response_deserializer=parser(reply),
            _registered_method=True,
        )
    return methods


# --------------------------------------------------------------------------- tokens


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty without one)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def metadata_value(metadata: Any, key: str) -> str | None:
    """The value of ``key`` (lower case) in call metadata, or None."""
    for item in metadata or ():
        if item[0].lower() == key:
            value = item[1]
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def same_secret(given: str | None, expected: str) -> bool:
    """``given == expected``, in constant time in the length of ``expected``."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def refusing(handler: grpc.RpcMethodHandler, error: ExpertError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``error``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, error)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await abort(context, error)
        yield  # pragma: no cover (makes this an async generator)

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every RPC but health without ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        given = metadata_value(handler_call_details.invocation_metadata, AUTHORIZATION)
        if same_secret(given, self._expected):
            return handler
        return refusing(handler, ExpertError.unauthenticated())


__all__ = [
    "AUTHORIZATION",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_PREFIX",
    "MAX_GRPC_LIMIT",
    "KeepaliveConfig",
    "TLSConfig",
    "TokenInterceptor",
    "add_service",
    "bearer_metadata",
    "bind",
    "channel_credentials",
    "channel_options",
    "format_address",
    "metadata_value",
    "refusing",
    "same_secret",
    "serialize",
    "server_credentials",
    "server_options",
    "tune_allocator",
    "unary_methods",
]
