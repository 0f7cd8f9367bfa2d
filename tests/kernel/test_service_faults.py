"""Jobs under faults injected into their experts (:mod:`helpers.faults`): a slow expert within
the Sampler's ``expert_deadline_s`` changes nothing, one past it fails the job naming the
expert; an outage shorter than ``expert_outage_s`` is retried through (the result equal to an
uninterrupted run bit for bit), a longer one fails only the job that needs that expert; an
expert process killed inside a call and started again is picked up where the job was."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers.faults import FaultInjector, Rule
from helpers.remote import LoopThread, free_port, stream_failure
from helpers.server import start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from torch import Tensor

from poegen.expert_servers.server import ServerConfig
from poegen.expert_servers.server.expert_file import load_expert_file
from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
MIX = dict(means=[[-1.0, 0.0], [1.0, 0.0]], covariances=[[0.5, 0.5], [0.5, 0.5]],
           weights=[0.5, 0.5], name="mix")  # fmt: skip


def _request(address: str, num_steps: int = 8) -> sampler_pb2.GenerateRequest:
    factor = sampler_pb2.FactorSpec(address=address, weight=1.0)
    settings = sampler_pb2.SamplerSettings(num_particles=32, num_steps=num_steps, mcmc_steps=2)
    return sampler_pb2.GenerateRequest(factors=[factor], sample_shape=[2], settings=settings,
                                       seed=5)  # fmt: skip


@contextmanager
def _stub(address: str) -> Iterator[sampler_pb2_grpc.SamplerServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield sampler_pb2_grpc.SamplerServiceStub(channel)


def _result(replies: object, *, revisions: int = 1) -> sampler_pb2.GenerateResult:
    """The job's result, its expert records checked (``revisions`` each: one, or two for an
    expert that came back as a new host) and dropped, since revisions differ between hosts."""
    last = list(replies)[-1]  # type: ignore[call-overload]
    assert last.HasField("result")
    result = sampler_pb2.GenerateResult()
    result.CopyFrom(last.result)
    assert [len(r.revisions) for r in result.experts] == [revisions] * len(result.experts)
    del result.experts[:]
    return result


def _first_level(call: Iterator[sampler_pb2.GenerateResponse]) -> None:
    """Read the stream up to its first level event (the job is running past level 0)."""
    while not next(call).HasField("level"):
        pass


def test_latency_within_the_deadline_leaves_the_result_bit_for_bit(loop: LoopThread) -> None:
    faults = FaultInjector()
    expert = loop.serve(Gaussian((1.0, 0.0)), interceptors=[faults])
    sampler = loop.sampler(SamplerServerConfig(expert_deadline_s=scaled(10)))
    with _stub(sampler.address) as stub:
        undisturbed = _result(stub.Generate(_request(expert.address), timeout=scaled(30)))
        # half the Velocity calls (the rule's own seeded draw) wait 50 ms first
        faults.set(Rule(methods=("Velocity",), delay_s=0.05, probability=0.5, seed=3))
        slow = _result(stub.Generate(_request(expert.address), timeout=scaled(30)))
    assert faults.injected_on("Velocity") > 0
    assert slow == undisturbed


def test_latency_past_the_deadline_fails_the_job_naming_the_expert(loop: LoopThread) -> None:
    faults = FaultInjector()
    expert = loop.serve(Gaussian((1.0, 0.0)), interceptors=[faults])
    deadline = scaled(1.0)
    sampler = loop.sampler(
        SamplerServerConfig(expert_deadline_s=deadline, expert_outage_s=scaled(1.0))
    )
    with _stub(sampler.address) as stub:
        faults.set(Rule(methods=("Velocity",), delay_s=4 * deadline, after=2))
        code, field = stream_failure(stub.Generate(_request(expert.address), timeout=scaled(30)))
        # the expert's DEADLINE_EXCEEDED (never retried) is the job's UNAVAILABLE on its address
        assert (code, field) == (UNAVAILABLE, "factors[0].address")
        assert faults.injected_on("Velocity") == 1
        faults.clear()
        # the Sampler keeps serving: the same job, the expert quick again, succeeds
        assert _result(stub.Generate(_request(expert.address), timeout=scaled(30))).particles.data


class _Pausing(Gaussian):
    """A Gaussian that, after :meth:`pause_after` ``(k)``, holds each Velocity call past the
    k-th until :meth:`resume`: the test changes the faults while the job is known to be
    mid-way, however fast the machine runs it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls = 0
        self.paused = threading.Event()
        self._free = math.inf
        self._go = threading.Event()
        self._lock = threading.Lock()

    def pause_after(self, calls: int) -> None:
        with self._lock:
            self.calls, self._free = 0, calls

    def resume(self) -> None:
        self._go.set()

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        with self._lock:
            self.calls += 1
            hold = self.calls > self._free
        if hold:
            self.paused.set()
            if not self._go.wait(scaled(30)):
                raise TimeoutError("the test never resumed the expert")
        return super().velocity(x, sigma)


def test_an_expert_cancelling_a_call_fails_the_job_as_unavailable_not_cancelled(
    loop: LoopThread,
) -> None:
    """CANCELLED from the expert's side (a host shutting down cancels its calls) while nobody
    stopped the job: the expert went away, so the job fails UNAVAILABLE on its address; the
    job is not reported as cancelled (JobStatus FAILED, not CANCELLED)."""
    faults = FaultInjector()
    expert = loop.serve(Gaussian((1.0, 0.0)), interceptors=[faults])
    sampler = loop.sampler(SamplerServerConfig())
    with _stub(sampler.address) as stub:
        faults.set(Rule(methods=("Velocity",), code=grpc.StatusCode.CANCELLED, after=2))
        request = _request(expert.address)
        request.job_id = "cancelled-by-the-expert"
        assert stream_failure(stub.Generate(request, timeout=scaled(30))) == (
            UNAVAILABLE,
            "factors[0].address",
        )
        status = stub.GetJob(sampler_pb2.GetJobRequest(job_id=request.job_id), timeout=scaled(10))
        assert status.job.state == sampler_pb2.JOB_STATE_FAILED
        assert faults.injected_on("Velocity") == 1


def test_a_short_outage_mid_job_is_retried_through_bit_for_bit(loop: LoopThread) -> None:
    faults = FaultInjector()
    model = _Pausing((1.0, 0.0))
    expert = loop.serve(model, interceptors=[faults])
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=scaled(30)))
    request = _request(expert.address)
    with _stub(sampler.address) as stub:
        undisturbed = _result(stub.Generate(request, timeout=scaled(30)))
        model.pause_after(model.calls // 2)
        call = stub.Generate(request, timeout=scaled(30))
        assert model.paused.wait(scaled(30))  # half the job's Velocity calls are answered
        _first_level(call)  # so the outage window applies: the expert answered before
        faults.set(Rule(methods=("Velocity",), code=UNAVAILABLE, times=3))
        model.resume()
        resumed = _result(call)
    assert faults.injected_on("Velocity") == 3  # the outage really happened, and ended
    assert resumed == undisturbed


def test_an_outage_past_the_window_fails_only_the_job_needing_the_expert(
    loop: LoopThread,
) -> None:
    faults = FaultInjector()
    failing = loop.serve(Gaussian((1.0, 0.0)), interceptors=[faults])
    healthy = loop.serve(Gaussian((0.0, 1.0)))
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=scaled(1.0)))
    with _stub(sampler.address) as stub:
        reference = _result(stub.Generate(_request(healthy.address), timeout=scaled(30)))
        # down from its third Velocity call on, for good
        faults.set(Rule(methods=("Velocity",), code=UNAVAILABLE, after=2))
        doomed = stub.Generate(_request(failing.address), timeout=scaled(30))
        other = stub.Generate(_request(healthy.address), timeout=scaled(30))
        assert stream_failure(doomed) == (UNAVAILABLE, "factors[0].address")
        assert _result(other) == reference
    assert faults.injected_on("Velocity") >= 2  # the first call and at least one retry


def test_a_job_survives_its_expert_killed_inside_a_call_and_restarted(
    loop: LoopThread, tmp_path: Path
) -> None:
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"expert": "gaussian_mixture", "params": MIX}))
    port = free_port()
    # a child process serving the file, which SIGKILLs itself on its 21st Velocity call
    args = [str(config), "--port", str(port), "--kill", "Velocity", "--after", "20"]
    dying = start_process(["tests/helpers/faults.py", *args])
    sampler = loop.sampler(SamplerServerConfig(expert_outage_s=scaled(60)))
    address = f"127.0.0.1:{port}"
    try:
        with _stub(sampler.address) as stub:
            call = stub.Generate(_request(address, num_steps=20), timeout=scaled(120))
            assert dying.proc.wait(scaled(30)) == -signal.SIGKILL  # killed by its own rule
            # the job waits in its retries; the same expert comes back on the same port
            loop.serve(load_expert_file(config), ServerConfig(port=port))
            resumed = _result(call, revisions=2)  # served by both hosts
            undisturbed = _result(
                stub.Generate(_request(address, num_steps=20), timeout=scaled(60))
            )
    finally:
        dying.stop(signal.SIGKILL)
    assert resumed == undisturbed


def test_the_injector_refuses_a_kill_in_the_test_process_and_an_empty_rule() -> None:
    with pytest.raises(ValueError, match="kill"):
        FaultInjector(Rule(kill=True))  # SIGKILL here would end pytest itself
    with pytest.raises(ValueError, match="needs delay_s, code or kill"):
        Rule(methods=("Velocity",))
