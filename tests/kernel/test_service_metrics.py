"""The sampler's Prometheus metrics, scraped over HTTP from a real host: jobs by outcome and
state, levels done, expert calls and seconds by expert, each equal to what the jobs' own level
events report."""

from __future__ import annotations

import math
import urllib.request

import grpc
import pytest
import torch
from helpers.remote import LoopThread, wait_until
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor

from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import sampler_pb2, sampler_pb2_grpc


class NaNVelocity(Gaussian):
    """A fault injected on purpose: every velocity is NaN."""

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.full_like(x, math.nan)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=scaled(10)) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _request(address: str, steps: int) -> sampler_pb2.GenerateRequest:
    settings = sampler_pb2.SamplerSettings(num_particles=8, num_steps=steps, mcmc_steps=1)
    factor = sampler_pb2.FactorSpec(address=address, weight=1.0, name="prior")
    return sampler_pb2.GenerateRequest(
        factors=[factor], sample_shape=[2], settings=settings, seed=5
    )


def test_metrics_count_what_the_jobs_did(loop: LoopThread):
    good = loop.serve(Gaussian((1.0, 0.0), name="g"))
    slow = loop.serve(Gaussian((1.0, 0.0), delay_s=0.05, name="slow"))
    broken = loop.serve(NaNVelocity(name="nan"))
    sampler = loop.sampler(SamplerServerConfig(metrics_port=0))
    port = sampler.host.metrics_port
    assert port
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        replies = list(stub.Generate(_request(good.address, 6), timeout=scaled(60)))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(_request(broken.address, 6), timeout=scaled(60)))
        before = _scrape(port)
        cancelled = stub.Generate(_request(slow.address, 10_000), timeout=scaled(60))
        next(cancelled), next(cancelled)  # the job's status, its first level
        assert _scrape(port)[("poegen_sampler_jobs", (("state", "running"),))] == 1
        cancelled.cancel()
        assert wait_until(lambda: not sampler.host.servicer.jobs.running(), scaled(10))
    after = _scrape(port)
    # the completed job's levels and calls, exactly as its own level events report them (the
    # failed one stopped inside its first level)
    levels = [r.level for r in replies if r.HasField("level")]
    assert before[("poegen_sampler_levels_total", ())] == len(levels)
    calls = sum(t.calls for lv in levels for t in lv.timings)
    assert before[("poegen_sampler_expert_calls_total", (("expert", "prior"),))] == calls
    seconds = sum(t.seconds for lv in levels for t in lv.timings)
    assert before[("poegen_sampler_expert_seconds_total", (("expert", "prior"),))] == (
        pytest.approx(seconds)
    )
    finished = {
        outcome: after[("poegen_sampler_jobs_finished_total", (("outcome", outcome),))]
        for outcome in ("completed", "failed", "stopped")
    }
    assert finished == {"completed": 1, "failed": 1, "stopped": 1}
    assert after[("poegen_sampler_jobs", (("state", "running"),))] == 0
    assert after[("poegen_sampler_jobs", (("state", "queued"),))] == 0
    assert after[("poegen_sampler_levels_total", ())] > len(levels)  # the cancelled job's
