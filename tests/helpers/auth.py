"""Every RPC of a service, called by name from its descriptor, for the bearer-token tests.

The methods come from the service descriptor (``expert_pb2.DESCRIPTOR.services_by_name``), not
from a list in the tests, so an RPC added to the proto is covered without anyone remembering it.
Each call sends an empty request message (valid protobuf: zero bytes) with the given metadata;
the token interceptor answers before any request is read, so an empty request is enough to
see a refusal, and with the right token the service's own answer (OK or a request error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from poegen.kernel.errors import from_rpc_error

Metadata = Sequence[tuple[str, str]]


def methods(*services: ServiceDescriptor) -> list[MethodDescriptor]:
    return [m for service in services for m in service.methods]


async def call(
    channel: grpc.aio.Channel, method: MethodDescriptor, metadata: Metadata
) -> tuple[grpc.StatusCode, str | None]:
    """The status and error field of one call of ``method`` with an empty request.

    Streamed replies are read to the end, except that a reply stream is cancelled after its
    first reply (health's ``Watch`` never ends on its own)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    answered = asyncio.Event()
    try:
        if method.client_streaming:

            async def requests():  # type: ignore[no-untyped-def]
                yield b""
                # keep the request stream open until the server answers: a half-close racing
                # the interceptor's abort came back INTERNAL on a loaded machine
                await answered.wait()

            stream = channel.stream_stream(path)(requests(), metadata=metadata)
        elif method.server_streaming:
            stream = channel.unary_stream(path)(b"", metadata=metadata)
        else:
            await channel.unary_unary(path)(b"", metadata=metadata)
            return grpc.StatusCode.OK, None
        async for _ in stream:
            answered.set()  # a reply came: the request stream may end now
            if not method.client_streaming:
                stream.cancel()
                break
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as e:
        err = from_rpc_error(e)
        return e.code(), None if err is None else err.field
    finally:
        answered.set()


async def answers(
    channel: grpc.aio.Channel, rpcs: Sequence[MethodDescriptor], metadata: Metadata
) -> dict[str, tuple[grpc.StatusCode, str | None]]:
    """``{"Service/Method": (code, field)}`` for every method in ``rpcs``."""
    return {f"{m.containing_service.name}/{m.name}": await call(channel, m, metadata) for m in rpcs}


def bad_credentials(token: str) -> list[Metadata]:
    """Metadata a token interceptor must refuse: none, a wrong token, the token without the
    ``Bearer`` scheme, and the right token under another key."""
    return [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", token),),
        (("authorization", f"Bearer {token}x"),),
        (("x-token", f"Bearer {token}"),),
    ]
