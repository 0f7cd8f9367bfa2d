"""Bearer token, admin token, health without a token, TLS and mTLS (certificates: openssl CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import auth
from helpers.server import collect, rpc_error, run, running, velocity_request
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen.expert_servers.server import ExpertFileAdapter, ServerConfig, create_server
from poegen.expert_servers.server.config import ConfigError, load_server_config
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc

TOKEN = "user-token"
ADMIN = "admin-token"
BEARER = (("authorization", f"Bearer {TOKEN}"),)


def test_token_is_required_on_every_rpc_but_health() -> None:
    """All 13 RPCs of ExpertService (read from the descriptor) and server reflection are
    refused UNAUTHENTICATED, naming ``authorization``, for every bad credential; with the token
    each reaches its handler (no UNAUTHENTICATED); health answers without one (the probes')."""
    guarded = auth.methods(
        pb.DESCRIPTOR.services_by_name["ExpertService"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    assert len(guarded) == 14  # 13 expert RPCs + ServerReflectionInfo

    async def body() -> None:
        async with running(ServerConfig(token=TOKEN), expert=Gaussian()) as server:
            for metadata in auth.bad_credentials(TOKEN):
                refused = await auth.answers(server.channel, guarded, metadata)
                assert refused == dict.fromkeys(
                    refused, (grpc.StatusCode.UNAUTHENTICATED, "authorization")
                ), metadata
            admitted = await auth.answers(server.channel, guarded, BEARER)
            assert len(admitted) == 14
            assert all(code != grpc.StatusCode.UNAUTHENTICATED for code, _ in admitted.values())
            assert admitted["ExpertService/Describe"][0] == grpc.StatusCode.OK
            # the service is served (not UNIMPLEMENTED): every handler answered
            assert all(code != grpc.StatusCode.UNIMPLEMENTED for code, _ in admitted.values())
            health = health_pb2_grpc.HealthStub(server.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            open_ = await auth.answers(
                server.channel, auth.methods(health_pb2.DESCRIPTOR.services_by_name["Health"]), ()
            )
            # every health method passes the interceptor; Check and Watch answer SERVING
            # (List, newer than grpcio-health-checking's servicer, is UNIMPLEMENTED there)
            assert all(code != grpc.StatusCode.UNAUTHENTICATED for code, _ in open_.values())
            assert open_["Health/Check"] == open_["Health/Watch"] == (grpc.StatusCode.OK, None)
            # reflection with the token lists the services
            reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")

            async def requests() -> Any:
                yield request

            replies = await collect(reflect.ServerReflectionInfo(requests(), metadata=BEARER))
            names = {s.name for s in replies[0].list_services_response.service}
            assert {"poegen.v1.ExpertService", "grpc.health.v1.Health"} <= names
            info = await server.stub.Describe(pb.DescribeRequest(), metadata=BEARER)
            assert info.name == "gaussian"
            await server.stub.Velocity(velocity_request(), metadata=BEARER)

    run(body())


def test_load_model_needs_both_tokens(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump(
            {
                "expert": "gaussian_mixture",
                "params": {"means": [[0.0, 0.0]], "covariances": [[1.0, 1.0]], "weights": [1.0]},
            }
        )
    )
    config = ServerConfig(token=TOKEN, admin_token=ADMIN, model_root=tmp_path)

    async def body() -> None:
        async with running(config, adapter=ExpertFileAdapter()) as server:
            request = pb.LoadModelRequest(model_id="g.yaml")
            only_admin = (("x-poegen-admin-token", ADMIN),)
            code, _ = await rpc_error(collect(server.stub.LoadModel(request, metadata=only_admin)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, err = await rpc_error(collect(server.stub.LoadModel(request, metadata=BEARER)))
            assert code == grpc.StatusCode.PERMISSION_DENIED and err is not None
            events = await collect(server.stub.LoadModel(request, metadata=BEARER + only_admin))
            assert events[-1].stage == pb.LOAD_STAGE_READY

    run(body())


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="admin_token"):
        ServerConfig(token="same", admin_token="same")
    path = tmp_path / "server.yaml"
    path.write_text("server:\n  port: 70000\n  keepalive: {time_s: -1}\n  colour: blue\n")
    with pytest.raises(ConfigError) as e:
        load_server_config(path)
    message = str(e.value)
    assert (
        "server.port" in message
        and "server.keepalive.time_s" in message
        and "server.colour" in message
    )
    path.write_text("server:\n  tls: {cert_file: nowhere.pem, key_file: nowhere.key}\n")
    with pytest.raises(ConfigError, match=r"server\.tls"):
        load_server_config(path)


# ------------------------------------------------------------------ TLS


async def _secure_describe(port: int, credentials: grpc.ChannelCredentials) -> pb.DescribeResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return await expert_pb2_grpc.ExpertServiceStub(channel).Describe(
            pb.DescribeRequest(), timeout=scaled(10)
        )


def test_tls_round_trip(certs: dict[str, Path]) -> None:
    tls = {"cert_file": certs["server_cert"], "key_file": certs["server_key"]}

    async def body() -> None:
        host, port = create_server(ServerConfig(tls=tls), expert=Gaussian())
        await host.start()
        try:
            trusted = grpc.ssl_channel_credentials(certs["server_cert"].read_bytes())
            assert (await _secure_describe(port, trusted)).name == "gaussian"
            untrusted = grpc.ssl_channel_credentials(certs["client_cert"].read_bytes())
            code, _ = await rpc_error(_secure_describe(port, untrusted))
            assert code == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                stub = expert_pb2_grpc.ExpertServiceStub(plain)
                code, _ = await rpc_error(stub.Describe(pb.DescribeRequest(), timeout=scaled(5)))
                assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await host.stop(0)

    run(body())


def test_mtls_requires_a_client_certificate(certs: dict[str, Path]) -> None:
    tls = {
        "cert_file": certs["server_cert"],
        "key_file": certs["server_key"],
        "client_ca_file": certs["client_cert"],
    }

    async def body() -> None:
        host, port = create_server(ServerConfig(tls=tls), expert=Gaussian())
        await host.start()
        try:
            root = certs["server_cert"].read_bytes()
            with_cert = grpc.ssl_channel_credentials(
                root, certs["client_key"].read_bytes(), certs["client_cert"].read_bytes()
            )
            assert (await _secure_describe(port, with_cert)).name == "gaussian"
            code, _ = await rpc_error(_secure_describe(port, grpc.ssl_channel_credentials(root)))
            assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await host.stop(0)

    run(body())
