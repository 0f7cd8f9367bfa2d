"""Jobs with ids that outlive their clients and their Sampler (issue 16).

Against real Sampler and expert hosts on loopback: ids (chosen or assigned), status, Attach,
CancelJob, ListJobs, detached jobs, kept results; the job store (atomic records, one Sampler
per folder, checkpoints exact); and a Sampler stopped mid-job (drained past its grace, or
SIGKILLed as a process) and started again on the same store: the job goes on from its last
level and its result equals the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch
from helpers.remote import LoopThread, free_port, stream_failure, wait_until
from helpers.server import start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled

from poegen.clients.sampler_cli import SamplerFlags, sampler_config
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.jobs import (
    DirectoryJobStore,
    JobStoreError,
    MemoryJobStore,
    decode_checkpoint,
    encode_checkpoint,
)
from poegen.kernel.mcmc import TargetEval
from poegen.kernel.sampler import Checkpoint
from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import sampler_pb2, sampler_pb2_grpc
from poegen.v1.sampler_pb2 import JobState

S = JobState


def _request(address: str, steps: int = 12, **kw) -> sampler_pb2.GenerateRequest:
    settings = sampler_pb2.SamplerSettings(num_particles=16, num_steps=steps, mcmc_steps=1)
    return sampler_pb2.GenerateRequest(
        factors=[sampler_pb2.FactorSpec(address=address)], sample_shape=[2],
        settings=settings, seed=3, **kw,
    )  # fmt: skip


def _stub(address: str) -> tuple[grpc.Channel, sampler_pb2_grpc.SamplerServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, sampler_pb2_grpc.SamplerServiceStub(channel)


def _result(replies) -> sampler_pb2.GenerateResult:
    assert replies[-1].HasField("result")
    return replies[-1].result


# ------------------------------------------------------------------ ids, status, attach


def test_a_job_has_an_id_a_status_and_a_result_kept_for_attach(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    sampler = loop.sampler()
    channel, stub = _stub(sampler.address)
    with channel:
        replies = list(stub.Generate(_request(expert.address), timeout=scaled(60)))
        accepted = replies[0].job
        assert len(accepted.job_id) == 32 and accepted.state == S.JOB_STATE_RUNNING
        levels = sum(r.HasField("level") for r in replies)
        status = stub.GetJob(sampler_pb2.GetJobRequest(job_id=accepted.job_id)).job
        assert status.state == S.JOB_STATE_SUCCEEDED
        assert status.levels_done == status.levels == levels and status.ended_at > 0
        again = list(stub.Attach(sampler_pb2.AttachRequest(job_id=accepted.job_id)))
        assert again[0].job.state == S.JOB_STATE_SUCCEEDED
        assert again[-1].result == _result(replies) and len(again) == 2
        listed = stub.ListJobs(sampler_pb2.ListJobsRequest()).jobs
        assert [j.job_id for j in listed] == [accepted.job_id]


def test_a_chosen_id_is_used_once_and_bad_or_unknown_ids_are_refused(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    sampler = loop.sampler()
    channel, stub = _stub(sampler.address)
    with channel:
        replies = list(stub.Generate(_request(expert.address, job_id="run-1.a"), timeout=60))
        assert replies[0].job.job_id == "run-1.a"
        retried = stub.Generate(_request(expert.address, job_id="run-1.a"))
        assert stream_failure(retried) == (grpc.StatusCode.ALREADY_EXISTS, "job_id")
        for bad in ("a/b", "x" * 65, "../etc"):
            refused = stub.Generate(_request(expert.address, job_id=bad))
            assert stream_failure(refused) == (grpc.StatusCode.INVALID_ARGUMENT, "job_id")
        for rpc in (stub.GetJob, stub.CancelJob):
            request = {stub.GetJob: sampler_pb2.GetJobRequest,
                       stub.CancelJob: sampler_pb2.CancelJobRequest}[rpc]  # fmt: skip
            with pytest.raises(grpc.RpcError) as caught:
                rpc(request(job_id="nope"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert from_rpc_error(caught.value).field == "job_id"
        missing = stub.Attach(sampler_pb2.AttachRequest(job_id="nope"))
        assert stream_failure(missing) == (grpc.StatusCode.NOT_FOUND, "job_id")


def test_a_detached_job_outlives_its_stream_and_attach_gets_the_rest(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    sampler = loop.sampler()
    channel, stub = _stub(sampler.address)
    with channel:
        whole = list(stub.Generate(_request(expert.address, steps=40), timeout=scaled(60)))
        call = stub.Generate(_request(expert.address, steps=40, detach=True))
        job_id = next(call).job.job_id
        assert next(call).HasField("level")
        call.cancel()  # the client leaves
        attached = list(stub.Attach(sampler_pb2.AttachRequest(job_id=job_id), timeout=60))
        assert attached[0].HasField("job")
        assert attached[-1].result == _result(whole)  # ran on, undisturbed
        assert stub.GetJob(sampler_pb2.GetJobRequest(job_id=job_id)).job.state == (
            S.JOB_STATE_SUCCEEDED
        )
        # without detach, leaving cancels the job
        call = stub.Generate(_request(expert.address, steps=400))
        job_id = next(call).job.job_id
        call.cancel()
        cancelled = lambda: stub.GetJob(sampler_pb2.GetJobRequest(job_id=job_id)).job.state  # noqa: E731
        assert wait_until(lambda: cancelled() == S.JOB_STATE_CANCELLED, timeout=scaled(10))


def test_cancel_frees_the_slot_at_once_and_a_queued_job_leaves_the_queue(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.02, name="g"))
    sampler = loop.sampler(SamplerServerConfig(max_jobs=1, max_queued=4))
    channel, stub = _stub(sampler.address)
    with channel:
        running = stub.Generate(_request(expert.address, steps=10_000, job_id="long"))
        assert next(running).job.state == S.JOB_STATE_RUNNING and next(running)
        queued = stub.Generate(_request(expert.address, steps=10_000, job_id="queued", detach=True))
        assert next(queued).job.state == S.JOB_STATE_QUEUED
        waiting = stub.Generate(_request(expert.address, job_id="short"))
        assert next(waiting).job.state == S.JOB_STATE_QUEUED
        gone = stub.CancelJob(sampler_pb2.CancelJobRequest(job_id="queued")).job
        assert gone.state == S.JOB_STATE_CANCELLED and gone.levels_done == 0
        assert stream_failure(queued) == (grpc.StatusCode.CANCELLED, "job_id")
        started = time.monotonic()
        stopped = stub.CancelJob(sampler_pb2.CancelJobRequest(job_id="long")).job
        assert stopped.state == S.JOB_STATE_CANCELLED
        rest = list(waiting)  # the short job got the slot and ran
        assert rest[-1].HasField("result")
        print(f"cancel to the next job's result: {time.monotonic() - started:.2f} s")
        again = stub.CancelJob(sampler_pb2.CancelJobRequest(job_id="short")).job
        assert again.state == S.JOB_STATE_SUCCEEDED  # an ended job keeps its state
        attach_cancelled = stub.Attach(sampler_pb2.AttachRequest(job_id="long"))
        assert stream_failure(attach_cancelled) == (grpc.StatusCode.CANCELLED, "job_id")
        listed = [j.job_id for j in stub.ListJobs(sampler_pb2.ListJobsRequest()).jobs]
        assert listed == ["short", "long", "queued"]  # ended ones, newest first


def test_a_failed_job_keeps_its_error_for_status_and_attach(loop: LoopThread):
    sampler = loop.sampler(SamplerServerConfig(expert_retries=0))
    channel, stub = _stub(sampler.address)
    with channel:
        dead = f"127.0.0.1:{free_port()}"
        code, field = stream_failure(stub.Generate(_request(dead, job_id="dead")))
        assert (code, field) == (grpc.StatusCode.UNAVAILABLE, "factors[0].address")
        status = stub.GetJob(sampler_pb2.GetJobRequest(job_id="dead")).job
        assert status.state == S.JOB_STATE_FAILED
        assert status.error_code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert status.error_field == "factors[0].address"
        attached = stub.Attach(sampler_pb2.AttachRequest(job_id="dead"))
        assert stream_failure(attached) == (code, field)


def test_ended_jobs_are_kept_up_to_max_kept_jobs(loop: LoopThread):
    expert = loop.serve(Gaussian((1.0, 0.0), name="g"))
    sampler = loop.sampler(SamplerServerConfig(max_kept_jobs=2))
    channel, stub = _stub(sampler.address)
    with channel:
        for n in range(3):
            list(stub.Generate(_request(expert.address, job_id=f"j{n}"), timeout=60))
        listed = [j.job_id for j in stub.ListJobs(sampler_pb2.ListJobsRequest()).jobs]
        assert listed == ["j2", "j1"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetJob(sampler_pb2.GetJobRequest(job_id="j0"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ the store


def _checkpoint(with_optional: bool) -> Checkpoint:
    g = torch.Generator().manual_seed(1)
    n = 5
    here = TargetEval(
        score=torch.randn(n, 3, generator=g) if with_optional else None,
        log_prob=torch.randn(n, generator=g) if with_optional else None,
        velocity=torch.randn(n, 3, generator=g),
        log_rate=torch.randn(n, generator=g, dtype=torch.float64) if with_optional else None,
    )
    return Checkpoint(
        4, torch.randn(n, 3, generator=g), here, torch.randn(n, dtype=torch.float64),
        torch.randn(n, dtype=torch.float64), -0.1 + 1e-17, 1 / 3, 0.7, g.get_state(),
    )  # fmt: skip


@pytest.mark.parametrize("with_optional", [True, False])
def test_a_checkpoint_round_trips_bit_for_bit(with_optional):
    saved = _checkpoint(with_optional)
    loaded, revisions = decode_checkpoint(encode_checkpoint(saved, [["a.1", "a.2"], ["b"]]))
    assert revisions == [["a.1", "a.2"], ["b"]]
    for name in ("x", "log_w", "potential", "generator_state"):
        assert torch.equal(getattr(loaded, name), getattr(saved, name))
    for name in ("score", "log_prob", "velocity", "log_rate", "tie_log_prob"):
        a, b = getattr(loaded.here, name), getattr(saved.here, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype)
    assert (loaded.levels_done, loaded.log_z, loaded.scale, loaded.step_scale) == (
        saved.levels_done, saved.log_z, saved.scale, saved.step_scale,
    )  # fmt: skip
    for broken in (b"", b"\x00" * 16, encode_checkpoint(saved, [])[:-3]):
        with pytest.raises(JobStoreError, match="unreadable checkpoint"):
            decode_checkpoint(broken)


@pytest.mark.parametrize("kind", ["memory", "directory"])
def test_job_stores_keep_records_per_job(kind, tmp_path):
    store = MemoryJobStore() if kind == "memory" else DirectoryJobStore(tmp_path / "jobs")
    store.put("a", "request", b"1")
    store.put("b", "status", b"2")
    store.put("a", "request", b"3")  # replaced whole
    assert store.get("a", "request") == b"3" and store.get("a", "result") is None
    assert sorted(store.job_ids()) == ["a", "b"]
    store.discard("a", "request")
    assert store.get("a", "request") is None
    store.delete("b")
    assert store.get("b", "status") is None and "b" not in store.job_ids()
    with pytest.raises(ValueError, match="job id"):
        store.put("../x", "status", b"")
    with pytest.raises(ValueError, match="record"):
        store.put("a", "secrets", b"")
    store.close()


def test_a_directory_store_has_one_sampler_and_leaves_no_partial_record(tmp_path):
    root = tmp_path / "jobs"
    store = DirectoryJobStore(root)
    with pytest.raises(JobStoreError, match="another Sampler uses it"):
        DirectoryJobStore(root)
    store.put("job", "checkpoint", b"x" * 1000)
    assert sorted(p.name for p in (root / "job").iterdir()) == ["checkpoint"]
    store.close()
    DirectoryJobStore(root).close()  # released: the next Sampler takes it


def test_the_cli_picks_a_durable_store_for_a_fixed_port(monkeypatch, tmp_path):
    monkeypatch.delenv("POEGEN_JOB_STORE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert sampler_config(SamplerFlags(port=50050)).job_store == (
        tmp_path / "poegen" / "sampler-50050"
    )
    assert sampler_config(SamplerFlags(port=0)).job_store is None  # a restart cannot keep it
    assert sampler_config(SamplerFlags(port=50050, job_store="memory")).job_store is None
    monkeypatch.setenv("POEGEN_JOB_STORE", str(tmp_path / "env"))
    assert sampler_config(SamplerFlags()).job_store == tmp_path / "env"
    assert sampler_config(SamplerFlags(job_store=str(tmp_path / "flag"))).job_store == (
        tmp_path / "flag"
    )


# ------------------------------------------------------------------ a Sampler restarted


def test_a_sampler_stopped_past_its_grace_resumes_the_job_on_restart(loop: LoopThread, tmp_path):
    """Drained with no grace, the job is stopped after a level with its checkpoint; a new
    Sampler on the store resumes it before serving, and Attach gets the uninterrupted result."""
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    config = SamplerServerConfig(job_store=tmp_path / "jobs")
    request = _request(expert.address, steps=40, job_id="survivor")
    undisturbed = loop.sampler()
    channel, stub = _stub(undisturbed.address)
    with channel:
        whole = _result(list(stub.Generate(request, timeout=scaled(60))))
    first = loop.sampler(config)
    channel, stub = _stub(first.address)
    with channel:
        call = stub.Generate(request, timeout=scaled(60))
        head = [next(call) for _ in range(4)]  # the status, three levels
        loop.stop(first.host)  # grace 0: the running job stops, resumable
        code, field = stream_failure(call)
        assert (code, field) == (grpc.StatusCode.UNAVAILABLE, "request")
    assert head[-1].level.step == 2
    second = loop.sampler(config)
    channel, stub = _stub(second.address)
    with channel:
        attached = list(stub.Attach(sampler_pb2.AttachRequest(job_id="survivor"), timeout=60))
        status = stub.GetJob(sampler_pb2.GetJobRequest(job_id="survivor")).job
    assert attached[-1].result == whole
    assert status.state == S.JOB_STATE_SUCCEEDED and status.resumes == 1
    metrics = second.host.servicer.metrics.registry
    assert metrics.get_sample_value("poegen_sampler_jobs_resumed_total") == 1
    assert attached[0].job.levels_done >= 3  # went on from its checkpoint, not from the start


def test_a_sampler_process_killed_mid_job_resumes_it_bit_for_bit(loop: LoopThread, tmp_path):
    """SIGKILL (no drain at all) after a few levels; the process started again on the same
    store resumes the job from its last checkpoint."""
    expert = loop.serve(Gaussian((1.0, 0.0), delay_s=0.01, name="g"))
    request = _request(expert.address, steps=60, job_id="killed")
    port = free_port()
    args = ["-m", "poegen.clients.cli", "sampler", "--port", str(port),
            "--job-store", str(tmp_path / "jobs")]  # fmt: skip
    sampler = start_process(args)
    try:
        channel, stub = _stub(f"127.0.0.1:{port}")
        with channel:
            whole = list(stub.Generate(_request(expert.address, steps=60), timeout=scaled(60)))
            call = stub.Generate(request, timeout=scaled(60))
            head = [next(call) for _ in range(6)]
            sampler.stop(signal.SIGKILL)
            with pytest.raises(grpc.RpcError):
                list(call)
        sampler = start_process(args)
        channel, stub = _stub(f"127.0.0.1:{port}")
        with channel:
            attached = list(stub.Attach(sampler_pb2.AttachRequest(job_id="killed"), timeout=60))
            status = stub.GetJob(sampler_pb2.GetJobRequest(job_id="killed")).job
    finally:
        sampler.stop(signal.SIGKILL)
    assert head[-1].level.step == 4
    resumed, undisturbed = attached[-1].result, _result(whole)
    assert resumed == undisturbed  # particles, log-weights, evidence, revisions: bit for bit
    assert status.resumes == 1 and status.levels_done == status.levels
    assert attached[0].job.levels_done >= 5
