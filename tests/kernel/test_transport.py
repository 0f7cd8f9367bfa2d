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
from helpers.server import REPO, rpc_error, run, running
from helpers.server_experts import Gaussian

from poegen.expert_servers.server import ServerConfig, interceptors
from poegen.expert_servers.server import config as server_config
from poegen.kernel import codec, transport
from poegen.v1 import expert_pb2 as pb


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
    async def body() -> None:
        async with running(ServerConfig(token="tok"), expert=Gaussian()) as server:
            code, err = await rpc_error(server.stub.Describe(pb.DescribeRequest()))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert err is not None and err.field == transport.AUTHORIZATION
            metadata = transport.bearer_metadata("tok")
            reply = await server.stub.Describe(pb.DescribeRequest(), metadata=metadata)
            assert reply.name == "gaussian"

    run(body())


def test_tune_allocator_reports_whether_it_applied() -> None:
    applied = transport.tune_allocator()
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()):
        assert applied
