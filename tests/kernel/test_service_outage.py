"""A job outlives its expert's restart: an expert process SIGKILLed mid-job and started again
on the same port within the Sampler's ``expert_outage_s`` is picked up where the job was, and
the job's result equals an uninterrupted run bit for
bit. Past the window the job fails, naming the expert."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
import yaml
from helpers.remote import LoopThread, free_port
from helpers.server import start_process
from helpers.timing import scaled

from poegen.kernel.errors import from_rpc_error
from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

MIX = dict(means=[[-1.0, 0.0], [1.0, 0.0]], covariances=[[0.5, 0.5], [0.5, 0.5]],
           weights=[0.5, 0.5], name="mix")  # fmt: skip


def _serve(config: Path, port: int):
    args = ["-m", "poegen.clients.cli", "serve", "analytic", "--config", str(config)]
    return start_process([*args, "--port", str(port)])


def _request(address: str) -> sampler_pb2.GenerateRequest:
    factor = sampler_pb2.FactorSpec(address=address, weight=1.0)
    settings = sampler_pb2.SamplerSettings(num_particles=64, num_steps=400, mcmc_steps=2)
    return sampler_pb2.GenerateRequest(factors=[factor], sample_shape=[2], settings=settings,
                                       seed=7)  # fmt: skip


# down 1 s, or the 10 s of the "done when": the job waits in its retries meanwhile
@pytest.mark.parametrize("down_s", [1.0, 10.0], ids=["1s", "10s"])
def test_a_job_survives_its_expert_killed_and_restarted(
    loop: LoopThread, tmp_path: Path, down_s: float
):
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX}))
    port = free_port()
    expert = _serve(config, port)
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=scaled(60)))
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(sampler.address) as channel:
            stub = sampler_pb2_grpc.SamplerServiceStub(channel)
            whole = list(stub.Generate(_request(address), timeout=scaled(120)))
            call = stub.Generate(_request(address), timeout=scaled(120))
            head = [next(call) for _ in range(5)]
            expert.stop(signal.SIGKILL)  # mid-job: no drain, connections reset
            time.sleep(down_s)  # down for a while (the job retries meanwhile)
            expert = _serve(config, port)
            rest = list(call)
        assert len(head) + len(rest) == len(whole)
        resumed, undisturbed = rest[-1].result, whole[-1].result
        # particles, log-weights, evidence: bit for bit; the record shows the expert restarted
        # (its new process numbers its revision anew)
        assert len(resumed.experts[0].revisions) == 2
        del resumed.experts[:], undisturbed.experts[:]
        assert resumed == undisturbed
    finally:
        expert.stop(signal.SIGKILL)


def test_past_the_outage_window_the_job_fails_naming_the_expert(loop: LoopThread, tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX}))
    port = free_port()
    expert = _serve(config, port)
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=1.0))
    with grpc.insecure_channel(sampler.address) as channel:
        call = sampler_pb2_grpc.SamplerServiceStub(channel).Generate(
            _request(f"127.0.0.1:{port}"), timeout=scaled(120)
        )
        while not next(call).HasField("level"):  # the expert has answered (the job status first)
            pass
        expert.stop(signal.SIGKILL)
        try:
            list(call)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert from_rpc_error(e).field == "factors[0].address"
        else:
            raise AssertionError("the job finished without its expert")


def test_an_address_that_never_answered_fails_after_the_retries(loop: LoopThread):
    """The outage window is for experts that were up: a wrong address fails after
    expert_retries, long before a 600 s window (the call's own deadline is 60 s)."""
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=600.0))
    with grpc.insecure_channel(sampler.address) as channel:
        call = sampler_pb2_grpc.SamplerServiceStub(channel).Generate(
            _request(f"127.0.0.1:{free_port()}"), timeout=scaled(60)
        )
        try:
            list(call)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            assert from_rpc_error(e).field == "factors[0].address"
        else:
            raise AssertionError("a job with no expert finished")
