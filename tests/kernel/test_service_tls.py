"""The Sampler calls experts over TLS and mTLS (``expert_ca_file``, ``expert_cert_file`` /
``expert_key_file``), against real expert hosts with certificates made by openssl."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from helpers.remote import LoopThread
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen.expert_servers.server import ServerConfig
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import sampler_pb2, sampler_pb2_grpc


def _generate(sampler_address: str, expert_address: str) -> list[sampler_pb2.GenerateResponse]:
    settings = sampler_pb2.SamplerSettings(num_particles=8, num_steps=3, mcmc_steps=1)
    request = sampler_pb2.GenerateRequest(
        factors=[sampler_pb2.FactorSpec(address=expert_address, weight=1.0)],
        sample_shape=[2],
        settings=settings,
        seed=2,
    )
    with grpc.insecure_channel(sampler_address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        return list(stub.Generate(request, timeout=scaled(60)))


def _unavailable(sampler_address: str, expert_address: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(sampler_address, expert_address)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(caught.value).field == "factors[0].address"


def test_the_sampler_calls_a_tls_expert_trusting_its_ca(loop: LoopThread, certs: dict[str, Path]):
    tls = {"cert_file": certs["server_cert"], "key_file": certs["server_key"]}
    expert = loop.serve(Gaussian(), ServerConfig(tls=tls))
    trusting = loop.sampler(SamplerServerConfig(expert_ca_file=certs["server_cert"]))
    assert _generate(trusting.address, expert.address)[-1].HasField("result")
    plain = loop.sampler(SamplerServerConfig(expert_retries=0))
    _unavailable(plain.address, expert.address)
    wrong_ca = loop.sampler(
        SamplerServerConfig(expert_ca_file=certs["client_cert"], expert_retries=0)
    )
    _unavailable(wrong_ca.address, expert.address)


def test_the_sampler_presents_its_certificate_to_an_mtls_expert(
    loop: LoopThread, certs: dict[str, Path]
):
    tls = {
        "cert_file": certs["server_cert"],
        "key_file": certs["server_key"],
        "client_ca_file": certs["client_cert"],
    }
    expert = loop.serve(Gaussian(), ServerConfig(tls=tls))
    with_cert = loop.sampler(
        SamplerServerConfig(
            expert_ca_file=certs["server_cert"],
            expert_cert_file=certs["client_cert"],
            expert_key_file=certs["client_key"],
        )
    )
    assert _generate(with_cert.address, expert.address)[-1].HasField("result")
    without = loop.sampler(
        SamplerServerConfig(expert_ca_file=certs["server_cert"], expert_retries=0)
    )
    _unavailable(without.address, expert.address)


def test_tls_settings_are_checked_at_start_up(certs: dict[str, Path], tmp_path: Path):
    with pytest.raises(ValueError, match="expert_cert_file and expert_key_file go together"):
        SamplerServerConfig(expert_cert_file=certs["client_cert"])
    with pytest.raises(ValueError, match="expert_ca_file: not a file"):
        SamplerServerConfig(expert_ca_file=tmp_path / "missing.pem")
