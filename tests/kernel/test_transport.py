"""The shared gRPC plumbing (poegen.kernel.transport): layering, options, tokens, credentials,
and the codec-aware service registration, against real servers on 127.0.0.1."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from helpers import auth
from helpers.server import REPO, run, running
from helpers.server_experts import Gaussian

from poegen.expert_servers.server import ServerConfig, interceptors
from poegen.expert_servers.server import config as server_config
from poegen.kernel import codec, transport
from poegen.kernel.service import SamplerServerConfig, create_sampler_server
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import sampler_pb2

REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def test_the_kernel_imports_nothing_from_expert_servers() -> None:
    """DESIGN: the kernel imports torch and the generated proto code, nothing model-specific."""
    code = (
        "import sys, poegen.kernel.service, poegen.kernel.remote, poegen.kernel.transport; "
        "bad = sorted(m for m in sys.modules if m.startswith('poegen.expert_servers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_expert_host_shares_the_kernels_plumbing() -> None:
    # one definition of each, re-exported where the host's users found them before
    assert server_config.TLSConfig is transport.TLSConfig
    assert server_config.KeepaliveConfig is transport.KeepaliveConfig
    assert server_config.DEFAULT_MAX_MESSAGE_BYTES == transport.DEFAULT_MAX_MESSAGE_BYTES
    assert interceptors.TokenInterceptor is transport.TokenInterceptor
    options = dict(transport.server_options(1 << 20, transport.KeepaliveConfig()))
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.so_reuseport"] == 0


def test_metadata_helpers() -> None:
    assert transport.bearer_metadata(None) == ()
    metadata = transport.bearer_metadata("t")
    assert transport.metadata_value(metadata, "authorization") == "Bearer t"
    assert transport.metadata_value([("Authorization", b"Bearer t")], "authorization") == "Bearer t"
    assert transport.same_secret("Bearer t", "Bearer t")
    assert not transport.same_secret(None, "x") and not transport.same_secret("y", "x")
    assert transport.format_address("::1", 5) == "[::1]:5"
    assert transport.format_address("127.0.0.1", 5) == "127.0.0.1:5"


def test_client_mtls_needs_both_cert_and_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="cert_file"):
        transport.channel_credentials(cert_file=cert)
    assert isinstance(transport.channel_credentials(), grpc.ChannelCredentials)


def test_generated_stubs_read_wire_messages() -> None:
    """Replies built as WireMessage / Serialized are plain protobuf to any client."""

    async def body() -> None:
        x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        sigma = torch.full((4,), 0.5, dtype=torch.float64)
        async with running(ServerConfig(), expert=Gaussian()) as server:
            request = pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma))
            reply = await server.stub.Velocity(request)  # the generated stub
            assert reply.velocity.WhichOneof("storage") == "data" and reply.revision
            v = codec.decode(reply.velocity, field="velocity")
            assert v.dtype == torch.float64 and torch.equal(v, Gaussian().velocity(x, sigma))

    run(body())


def test_the_token_guards_every_rpc_but_health() -> None:
    """Both hosts share TokenInterceptor: every RPC of the expert host (ExpertService's 13) and
    of the sampler host (SamplerService's 5), read from the descriptors, and server
    reflection on each, is refused UNAUTHENTICATED naming ``authorization`` for each bad
    credential and reaches its handler with the token; health needs none (the probes')."""
    expert_rpcs = auth.methods(pb.DESCRIPTOR.services_by_name["ExpertService"], REFLECTION)
    sampler_rpcs = auth.methods(
        sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"], REFLECTION
    )
    assert len(expert_rpcs) - 1 + len(sampler_rpcs) - 1 == 13 + 5
    health_rpcs = [HEALTH.methods_by_name["Check"], HEALTH.methods_by_name["Watch"]]

    async def check(channel: grpc.aio.Channel, rpcs: list) -> None:
        for metadata in auth.bad_credentials("tok"):
            refused = await auth.answers(channel, rpcs, metadata)
            assert len(refused) == len(rpcs)
            unauthenticated = (grpc.StatusCode.UNAUTHENTICATED, transport.AUTHORIZATION)
            assert refused == dict.fromkeys(refused, unauthenticated), metadata
        admitted = await auth.answers(channel, rpcs, transport.bearer_metadata("tok"))
        refusals = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
        assert all(code not in refusals for code, _ in admitted.values()), admitted
        for metadata in auth.bad_credentials("tok"):
            health = await auth.answers(channel, health_rpcs, metadata)
            assert set(health.values()) == {(grpc.StatusCode.OK, None)}

    async def body() -> None:
        async with running(ServerConfig(token="tok"), expert=Gaussian()) as server:
            await check(server.channel, expert_rpcs)
            metadata = transport.bearer_metadata("tok")
            reply = await server.stub.Describe(pb.DescribeRequest(), metadata=metadata)
            assert reply.name == "gaussian"
        sampler, port = create_sampler_server(SamplerServerConfig(token="tok"))
        await sampler.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await check(channel, sampler_rpcs)
        finally:
            await sampler.stop(0)

    run(body())


def test_tune_allocator_reports_whether_it_applied() -> None:
    applied = transport.tune_allocator()
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()):
        assert applied
