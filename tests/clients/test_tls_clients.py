"""The SDK over TLS and mTLS: a Sampler and its experts that require certificates, reached by
``Client(tls=..., expert_tls=...)`` through the service and in-process, and by the CLI's
``describe`` / ``health`` with ``POEGEN_CA_FILE`` (certificates made by openssl)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.remote import LoopThread
from helpers.stack import BAR, MIX, REWARD, poegen, spec_data
from helpers.timing import scaled

from poegen import Client, GenerationSpec
from poegen.clients.endpoints import ClientTLS, describe, health
from poegen.clients.errors import PoegenError
from poegen.expert_servers.analytic import GaussianMixture, LinearReward
from poegen.expert_servers.server import ServerConfig
from poegen.kernel.service import SamplerServerConfig
from poegen.kernel.transport import TLSConfig


@pytest.fixture
def secure(loop: LoopThread, certs: dict[str, Path]):
    """Experts and a Sampler on TLS with client certificates required (mTLS)."""
    server = TLSConfig(
        cert_file=certs["server_cert"],
        key_file=certs["server_key"],
        client_ca_file=certs["client_cert"],
    )
    experts = {
        name: loop.serve(expert, ServerConfig(tls=server)).address
        for name, expert in [
            ("mix", GaussianMixture(**MIX)),
            ("bar", GaussianMixture(**BAR)),
            ("right", LinearReward(**REWARD)),
        ]
    }
    sampler = loop.sampler(
        SamplerServerConfig(
            tls=server,
            expert_ca_file=certs["server_cert"],
            expert_cert_file=certs["client_cert"],
            expert_key_file=certs["client_key"],
        )
    )
    tls = ClientTLS(certs["server_cert"], certs["client_cert"], certs["client_key"])
    return sampler.address, experts, tls


def test_the_sdk_generates_through_an_mtls_sampler_and_in_process(secure):
    sampler, experts, tls = secure
    spec = GenerationSpec.from_mapping(spec_data())
    # the client itself describes the experts (for the sample shape): expert_tls too
    with Client(sampler, endpoints=experts, tls=tls, expert_tls=tls) as client:
        served = client.generate(spec, timeout=scaled(60))
    with Client(None, endpoints=experts, expert_tls=tls) as client:
        local = client.generate(spec, timeout=scaled(60))
    assert torch.equal(served.particles, local.particles)  # the same job, either way
    with Client(sampler, endpoints=experts) as plain, pytest.raises(PoegenError):
        plain.generate(spec, timeout=scaled(30))


def test_describe_and_health_over_mtls(secure):
    _, experts, tls = secure
    assert describe(experts["mix"], tls=tls).name == "mix"
    assert health(experts["mix"], tls=tls) == "SERVING"
    assert health(experts["mix"]) == "UNREACHABLE"  # plaintext to a TLS server
    no_cert = ClientTLS(tls.ca_file)
    assert health(experts["mix"], tls=no_cert) == "UNREACHABLE"  # mTLS wants a certificate


def test_the_cli_reads_its_tls_files_from_the_environment(secure, certs):
    _, experts, _ = secure
    env = {
        "POEGEN_CA_FILE": str(certs["server_cert"]),
        "POEGEN_CERT_FILE": str(certs["client_cert"]),
        "POEGEN_KEY_FILE": str(certs["client_key"]),
    }
    done = poegen("health", experts["mix"], env=env)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
    assert poegen("health", experts["mix"]).returncode == 1


def test_client_tls_files_are_checked(tmp_path, certs):
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        ClientTLS(certs["server_cert"], cert_file=certs["client_cert"])
    with pytest.raises(ValueError, match="ca_file"):
        ClientTLS(tmp_path / "missing.pem")
