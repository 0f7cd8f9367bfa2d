"""Expert hosts as processes: SIGTERM drain, and ``poegen serve analytic`` end to end."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from helpers.server import rpc_error, run, start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen.clients.cli import main
from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel import codec
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc

X = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
SIGMA = torch.tensor([0.4, 0.7])
MIXTURE = {"means": [[-1.0, 0.5]], "covariances": [[1.0, 0.5]], "weights": [1.0]}


def _velocity_request() -> pb.VelocityRequest:
    return pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA))


def _metrics(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=scaled(10)) as reply:
        return reply.read().decode()


def test_sigterm_drains_in_flight_calls_then_exits_zero() -> None:
    server = start_process(["tests/helpers/slow_server.py", "2.5", "10"])

    async def body() -> None:
        address = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            in_flight = asyncio.ensure_future(
                stub.Velocity(_velocity_request(), timeout=scaled(20))
            )
            await asyncio.sleep(1.0)  # the call is inside the expert's 2.5 s compute
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with grpc.aio.insecure_channel(address) as fresh:
                code, _ = await rpc_error(
                    expert_pb2_grpc.ExpertServiceStub(fresh).Describe(
                        pb.DescribeRequest(), timeout=scaled(3)
                    )
                )
                assert code == grpc.StatusCode.UNAVAILABLE  # the port is closed
            reply = await in_flight
            torch.testing.assert_close(
                codec.decode(reply.velocity, field="v"), Gaussian().velocity(X, SIGMA)
            )

    try:
        run(body())
        assert server.proc.wait(timeout=scaled(20)) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_poegen_serve_analytic_end_to_end(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "shifted.yaml").write_text(
        yaml.safe_dump({"expert": "gaussian_mixture", "params": {**MIXTURE, "means": [[3.0, 3.0]]}})
    )
    config = tmp_path / "expert.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "expert": "gaussian_mixture",
                "params": MIXTURE,
                "max_batch": 8,
                "latent_space": "toy-2d",
                "server": {"grace_s": 5},
            }
        )
    )
    server = start_process(
        [
            "-m",
            "poegen.clients.cli",
            "serve",
            "analytic",
            "--config",
            str(config),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-root",
            str(models),
        ],
        env={"POEGEN_ADMIN_TOKEN": "admin"},
    )
    expected = GaussianMixture(**MIXTURE).velocity(X, SIGMA)

    async def body() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            info = await stub.Describe(pb.DescribeRequest())
            assert (info.name, info.max_batch, info.latent_space) == (
                "gaussian_mixture",
                8,
                "toy-2d",
            )
            reply = await stub.Velocity(_velocity_request())
            torch.testing.assert_close(codec.decode(reply.velocity, field="v"), expected.float())
            code, _ = await rpc_error(stub.Velocity(pb.VelocityRequest(x=codec.encode(X))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            load = stub.LoadModel(
                pb.LoadModelRequest(model_id="shifted.yaml"),
                metadata=(("x-poegen-admin-token", "admin"),),
            )
            events = [event async for event in load]
            assert events[-1].stage == pb.LOAD_STAGE_READY
            info = await stub.Describe(pb.DescribeRequest())
            assert (info.model_id, info.revision) == ("shifted.yaml", events[-1].revision)

    try:
        run(body())
        match = re.fullmatch(
            r"poegen: metrics on 127\.0\.0\.1:(\d+)", server.proc.stdout.readline().strip()
        )
        assert match, "no metrics line"
        text = _metrics(int(match.group(1)))
        assert (
            'poegen_rpc_latency_seconds_bucket{le="0.1",method="/poegen.v1.ExpertService/Velocity"}'
            in text
        )
        assert 'poegen_batch_size_count{method="Velocity"} 1.0' in text
        assert re.search(
            r'poegen_rpc_errors_total\{code="INVALID_ARGUMENT",method="[^"]+Velocity"\} 1\.0', text
        )
        assert re.search(
            r'poegen_model_info\{model_id="shifted.yaml",revision="[^"]+"\} 1\.0', text
        )
        assert "poegen_model_serving 1.0" in text
        assert server.stop(signal.SIGINT) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_poegen_serve_rejects_a_bad_config_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "expert": "gaussian_mixture",
                "params": MIXTURE,
                "max_batch": 0,
                "server": {"port": 70000},
            }
        )
    )
    assert main(["serve", "analytic", "--config", str(config)]) == 2
    assert "server.port" in capsys.readouterr().err
    config.write_text(
        yaml.safe_dump({"expert": "gaussian_mixture", "params": MIXTURE, "max_batch": 0})
    )
    assert main(["serve", "analytic", "--config", str(config)]) == 2
    assert "max_batch" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"expert": "no_such_expert"}))
    assert main(["serve", "analytic", "--config", str(config)]) == 2
    assert "no_such_expert" in capsys.readouterr().err
