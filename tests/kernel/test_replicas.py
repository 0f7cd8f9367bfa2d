"""Replicas in one job (kernel/replicas.py): a factor's address names several expert hosts.

Real hosts on 127.0.0.1 (in this process on the test's loop, or ``poegen serve`` processes),
the real Sampler service. What is checked: a job against 3 replicas equals the job against 1
bit for bit, with its chunks served by all 3 and the same number of model calls in all; a
replica SIGKILLed mid-job costs the job nothing; a replica that comes back is used again; the
perimeter passes a list only when every replica is allowed (a ``dns:`` target only when
listed); malformed targets and replicas that disagree are refused naming the address.
"""

from __future__ import annotations

import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from helpers.remote import Jitter, LoopThread, free_port, wait_until
from helpers.server import start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen import Client, GenerationSpec
from poegen.expert_servers.server import ServerConfig
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError
from poegen.kernel.replicas import ReplicatedExpert, connect_expert, parse_target
from poegen.kernel.service import SamplerServerConfig
from poegen.kernel.transport import channel_credentials
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

MIX = dict(means=[[-1.0, 0.0], [1.0, 0.0]], covariances=[[0.5, 0.5], [0.5, 0.5]],
           weights=[0.5, 0.5], name="mix")  # fmt: skip


def _list(*ports: int) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


def _request(*addresses: str, steps: int = 6, particles: int = 32) -> sampler_pb2.GenerateRequest:
    factors = [sampler_pb2.FactorSpec(address=a, weight=1.0) for a in addresses]
    settings = sampler_pb2.SamplerSettings(num_particles=particles, num_steps=steps, mcmc_steps=1)
    return sampler_pb2.GenerateRequest(
        factors=factors, sample_shape=[2], settings=settings, seed=11
    )


def _generate(sampler_address: str, request: sampler_pb2.GenerateRequest) -> list:
    with grpc.insecure_channel(sampler_address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        return list(stub.Generate(request, timeout=scaled(60)))


def _refusal(sampler_address: str, address: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(sampler_address, _request(address))
    err = from_rpc_error(caught.value)
    assert err is not None, caught.value
    return caught.value.code(), err.field, err.reason


def _without_records(result: sampler_pb2.GenerateResult) -> sampler_pb2.GenerateResult:
    """The result less its expert records (revisions differ: one per host process)."""
    out = sampler_pb2.GenerateResult()
    out.CopyFrom(result)
    del out.experts[:]
    return out


def _model_calls(served) -> float:
    """Model calls the host made (its Prometheus batch-size histogram counts them)."""
    registry = served.host.metrics.registry
    return sum(
        registry.get_sample_value("poegen_batch_size_count", {"method": m}) or 0.0
        for m in ("Velocity", "Propose")
    )


# ------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    ("address", "members"),
    [
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ("127.0.0.1:1", "127.0.0.1:2")),
        ("ipv4: 10.0.0.1:50051 , 10.0.0.2:50051", ("10.0.0.1:50051", "10.0.0.2:50051")),
        ("ipv6:[::1]:1,[fd00::2]:1", ("[::1]:1", "[fd00::2]:1")),
    ],
)
def test_replica_lists_parse(address, members):
    assert parse_target(address).members == members


def test_dns_targets_parse():
    for address in ("dns:///poegen-flux-headless:50051", "dns:poegen-flux-headless:50051"):
        target = parse_target(address)
        assert (target.scheme, target.host, target.port) == ("dns", "poegen-flux-headless", 50051)


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("ipv4:", "lists no replica"),
        ("ipv4:127.0.0.1", "is not a.b.c.d:port"),
        ("ipv4:127.0.0.1:1,", "is not a.b.c.d:port"),
        ("ipv4:127.0.0.1:1,127.0.0.1:1", "twice"),
        ("ipv4:localhost:1", "is not a.b.c.d:port"),
        ("ipv4:999.0.0.1:1", "not an IP address"),
        ("ipv4:127.0.0.1:70000", "port must be"),
        ("ipv6:::1:5", "is not [v6]:port"),
        ("dns:///localhost", "expected dns:///host:port"),
        ("dns://8.8.8.8/localhost:1", "authority"),
    ],
)
def test_malformed_targets_are_refused_naming_the_address(loop: LoopThread, address, says):
    sampler = loop.sampler()
    code, field, reason = _refusal(sampler.address, address)
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "factors[0].address")
    assert says in reason


# ------------------------------------------------------------------ jobs


def test_a_job_on_three_replicas_equals_one_and_spreads_its_chunks(loop: LoopThread):
    """Chunks of 4 (the hosts' max_batch) of 32 particles; a Jitter proposer on 2 replicas
    (its seeded Propose goes whole to one of them)."""
    flows = [loop.serve(Gaussian((1.0, 0.0), max_batch=4, name="g")) for _ in range(3)]
    jitters = [loop.serve(Jitter()) for _ in range(2)]
    sampler = loop.sampler()
    one = _generate(sampler.address, _request(flows[0].address, jitters[0].address))
    calls_one = [_model_calls(s) for s in (*flows, *jitters)]
    assert calls_one[1:3] == [0, 0] and calls_one[4] == 0
    three = _generate(
        sampler.address,
        _request(_list(*(s.port for s in flows)), _list(*(s.port for s in jitters))),
    )
    assert _without_records(three[-1].result) == _without_records(one[-1].result)
    served = [_model_calls(s) - n for s, n in zip(flows, calls_one[:3], strict=True)]
    assert all(n > 0 for n in served), served  # every replica served chunks
    assert sum(served) == calls_one[0]  # as many model calls as on one replica
    assert [t.calls for e in three[:-1] for t in e.level.timings] == [
        t.calls for e in one[:-1] for t in e.level.timings
    ]  # and counted alike
    jitter_calls = [_model_calls(s) for s in jitters]
    assert sum(jitter_calls) == 2 * calls_one[3]
    records = three[-1].result.experts
    assert len(records[0].revisions) == 3  # one revision per host process


def test_a_replica_killed_mid_job_costs_the_job_nothing(loop: LoopThread, tmp_path: Path):
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX}))
    serve = ["-m", "poegen.clients.cli", "serve", "analytic", "--config", str(config)]
    with ThreadPoolExecutor(3) as pool:  # started together: each takes seconds to import
        replicas = list(pool.map(lambda _: start_process([*serve, "--port", "0"]), range(3)))
    try:
        sampler = loop.sampler(SamplerServerConfig(expert_outage_s=scaled(30)))
        request = _request(_list(*(r.port for r in replicas)), steps=60)
        alone = _generate(sampler.address, _request(f"127.0.0.1:{replicas[0].port}", steps=60))
        with grpc.insecure_channel(sampler.address) as channel:
            call = sampler_pb2_grpc.SamplerServiceStub(channel).Generate(
                request, timeout=scaled(60)
            )
            head = [next(call) for _ in range(3)]
            replicas[1].stop(signal.SIGKILL)  # mid-job: no drain, connections reset
            rest = list(call)
        assert len(head) + len(rest) == len(alone)
        assert _without_records(rest[-1].result) == _without_records(alone[-1].result)
    finally:
        for r in replicas:
            r.stop(signal.SIGKILL)


def test_a_replica_that_comes_back_is_used_again(loop: LoopThread):
    port = free_port()
    first = loop.serve(Gaussian(max_batch=4), ServerConfig(port=port))
    other = loop.serve(Gaussian(max_batch=4))
    x, sigma = torch.randn(4, 2), torch.full((4,), 0.5)
    with ReplicatedExpert.connect(_list(port, other.port), retries=0) as expert:
        assert expert.concurrent_chunks == 2
        want = expert.velocity(x, sigma).clone()
        first.stop()
        for _ in range(4):  # every call lands on the live replica
            assert torch.equal(expert.velocity(x, sigma), want)
        back = loop.serve(Gaussian(max_batch=4), ServerConfig(port=port))

        def served_by_the_new_host() -> bool:
            assert torch.equal(expert.velocity(x, sigma), want)
            return _model_calls(back) > 0

        assert wait_until(served_by_the_new_host, scaled(15))


def test_with_every_replica_down_the_job_fails_naming_the_factor(loop: LoopThread):
    hosts = [loop.serve(Gaussian(delay_s=0.002)) for _ in range(2)]
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=0.5))
    with grpc.insecure_channel(sampler.address) as channel:
        call = sampler_pb2_grpc.SamplerServiceStub(channel).Generate(
            _request(_list(*(h.port for h in hosts)), steps=400), timeout=scaled(60)
        )
        while not next(call).HasField("level"):  # the replicas have answered (the job status first)
            pass
        for h in hosts:
            h.stop()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(caught.value).field == "factors[0].address"


def test_replicas_that_disagree_are_refused_naming_both(loop: LoopThread):
    a, b = loop.serve(Gaussian(name="a")), loop.serve(Gaussian(name="b"))
    sampler = loop.sampler()
    code, field, reason = _refusal(sampler.address, _list(a.port, b.port))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "factors[0]")
    assert "disagree on name" in reason and a.address in reason and b.address in reason


# ------------------------------------------------------------------ perimeter


def test_a_list_passes_the_perimeter_only_when_every_replica_may_be_called(loop: LoopThread):
    hosts = [loop.serve(Gaussian((1.0, 0.0))) for _ in range(2)]
    listed = _list(*(h.port for h in hosts))
    outside = f"ipv4:{hosts[0].address},10.0.0.1:{hosts[1].port}"
    default = loop.sampler()  # no list: loopback only
    assert _generate(default.address, _request(listed))[-1].HasField("result")
    code, field, reason = _refusal(default.address, outside)
    assert (code, field) == (grpc.StatusCode.PERMISSION_DENIED, "factors[0].address")
    assert f"replica 10.0.0.1:{hosts[1].port}" in reason
    one_listed = loop.sampler(SamplerServerConfig(allowed_experts=(hosts[0].address,)))
    code, field, reason = _refusal(one_listed.address, listed)
    assert (code, field) == (grpc.StatusCode.PERMISSION_DENIED, "factors[0].address")
    assert hosts[1].address in reason
    both = loop.sampler(SamplerServerConfig(allowed_experts=tuple(h.address for h in hosts)))
    assert _generate(both.address, _request(listed))[-1].HasField("result")


def test_a_dns_target_is_called_only_when_listed(loop: LoopThread):
    """``localhost`` resolves to 127.0.0.1 (and maybe ::1, where nothing listens: a replica
    that is down from the start)."""
    host = loop.serve(Gaussian((1.0, 0.0)))
    target = f"dns:///localhost:{host.port}"
    code, field, _ = _refusal(loop.sampler().address, target)
    assert (code, field) == (grpc.StatusCode.PERMISSION_DENIED, "factors[0].address")
    listed = loop.sampler(SamplerServerConfig(allowed_experts=(target,)))
    via_dns = _generate(listed.address, _request(target))
    direct = _generate(loop.sampler().address, _request(host.address))
    assert _without_records(via_dns[-1].result) == _without_records(direct[-1].result)
    with connect_expert(target) as expert:
        assert isinstance(expert, ReplicatedExpert)
        assert host.address in expert.replicas


def test_a_plain_address_and_a_one_member_list_stay_one_remote_expert(loop: LoopThread):
    host = loop.serve(Gaussian())
    for address in (host.address, f"ipv4:{host.address}"):
        with connect_expert(address) as expert:
            assert type(expert) is RemoteExpert


def test_tls_replicas_of_a_dns_name_are_checked_against_the_name(loop: LoopThread, tmp_path):
    """A certificate naming only ``localhost`` (no IP): a replica dialled by its resolved
    address still presents the name, so the check passes; the bare address fails it."""
    key, cert = tmp_path / "name.key", tmp_path / "name.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    host = loop.serve(Gaussian(), ServerConfig(tls={"cert_file": cert, "key_file": key}))
    tls = channel_credentials(cert)
    with connect_expert(f"dns:///localhost:{host.port}", tls=tls, retries=0) as expert:
        assert expert.velocity(torch.zeros(2, 2), torch.full((2,), 0.5)).shape == (2, 2)
    with pytest.raises(RemoteExpertError) as caught:
        connect_expert(host.address, tls=tls, retries=0)
    assert caught.value.code == Code.UNAVAILABLE


# the spec of the replicas' docs section, run with this test's ports in place of 50061/50062
DOCS_SPEC = """\
seed: 3
sample_shape: [2]
settings: {num_particles: 16, num_steps: 4, mcmc_steps: 1}
experts:
  - address: ipv4:127.0.0.1:50061,127.0.0.1:50062
output: {decode: none}
"""


def test_the_docs_spec_runs_in_process_on_two_replicas_as_on_one(loop: LoopThread):
    hosts = [loop.serve(Gaussian((1.0, 0.0), max_batch=4)) for _ in range(2)]
    both = DOCS_SPEC.replace("50061", str(hosts[0].port)).replace("50062", str(hosts[1].port))
    one = both.replace(f"ipv4:{hosts[0].address},{hosts[1].address}", hosts[0].address)
    with Client() as client:
        results = [
            client.generate(GenerationSpec.from_mapping(yaml.safe_load(text)), timeout=scaled(60))
            for text in (both, one)
        ]
    assert torch.equal(results[0].particles, results[1].particles)
    assert torch.equal(results[0].weights, results[1].weights)
    assert all(_model_calls(h) > 0 for h in hosts)
