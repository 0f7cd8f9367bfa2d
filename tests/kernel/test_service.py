"""The SamplerService on 127.0.0.1 over real expert hosts: streamed levels, identity with the
in-process sampler, concurrent jobs, cancellation, bad requests, and the CLI end to end."""

from __future__ import annotations

import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from helpers.remote import (
    Counter,
    CountingGaussian,
    LoopThread,
    Served,
    free_port,
    stream_failure,
    wait_until,
)
from helpers.server import start_process
from helpers.server_experts import Gaussian, HalfSpace, LinearReward
from helpers.timing import scaled

from poegen.expert_servers.analytic import GaussianMixture
from poegen.expert_servers.analytic import LinearReward as AnalyticLinearReward
from poegen.kernel import codec
from poegen.kernel.experts import ExpertInfo, ExpertKind
from poegen.kernel.sampler import sample
from poegen.kernel.service import SamplerServerConfig
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2, sampler_pb2, sampler_pb2_grpc, tensor_pb2

SETTINGS = dict(num_particles=32, num_steps=6, mcmc_steps=2, ess_threshold=0.7)


def _stub(served: Served) -> tuple[grpc.Channel, sampler_pb2_grpc.SamplerServiceStub]:
    channel = grpc.insecure_channel(served.address)
    return channel, sampler_pb2_grpc.SamplerServiceStub(channel)


def _request(
    addresses: list[str], weights: list[float], **kw: object
) -> sampler_pb2.GenerateRequest:
    factors = [
        sampler_pb2.FactorSpec(address=a, weight=w) for a, w in zip(addresses, weights, strict=True)
    ]
    settings = sampler_pb2.SamplerSettings(**{**SETTINGS, **kw.pop("settings", {})})  # type: ignore[arg-type]
    return sampler_pb2.GenerateRequest(
        factors=factors, sample_shape=[2], settings=settings, seed=11, **kw
    )


def _split(replies: list[sampler_pb2.GenerateResponse]) -> tuple[list, sampler_pb2.GenerateResult]:
    """(level events, result) of a Generate stream: the job's status, levels, the result."""
    assert replies[0].HasField("job") and replies[0].job.job_id
    levels = [r.level for r in replies if r.HasField("level")]
    assert replies[-1].HasField("result") and len(levels) == len(replies) - 2
    return levels, replies[-1].result


def _experts() -> list[tuple[object, float]]:
    return [
        (Gaussian((1.0, 0.0), name="a"), 0.5),
        (Gaussian((0.0, 1.0), std=0.7, name="b"), 0.5),
        (LinearReward((1.0, -1.0)), 1.5),
        (HalfSpace(), 1.0),
    ]


def test_generate_streams_levels_and_matches_in_process(loop: LoopThread) -> None:
    experts = _experts()
    local = sample(
        [Factor(e, weight=w) for e, w in experts], (2,), SamplerSettings(**SETTINGS),
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    served = [loop.serve(e) for e, _ in experts]
    sampler = loop.sampler()
    channel, stub = _stub(sampler)
    with channel:
        request = _request([s.address for s in served], [w for _, w in experts], preview=True)
        levels, result = _split(list(stub.Generate(request)))
    assert len(levels) == len(local.trace)
    assert [lv.step for lv in levels] == list(range(len(levels)))
    for lv, tr in zip(levels, local.trace, strict=True):
        assert (lv.sigma, lv.ess, lv.resampled) == (tr.sigma, tr.ess, tr.resampled)
        assert lv.log_evidence == tr.log_evidence and lv.reward_scale == tr.reward_scale
        assert torch.equal(codec.decode(lv.preview, field="preview"), tr.preview)
        assert {t.name for t in lv.timings} == {"a", "b", "linear", "half_space"}
        assert all(t.calls >= 1 and t.seconds >= 0 for t in lv.timings)
    # ULA has no MH test; with rewards its moves pass the potential stage (resample-move)
    assert [lv.acceptance_rate for lv in levels] == [tr.acceptance for tr in local.trace]
    assert 0 < levels[0].acceptance_rate <= 1
    assert torch.equal(codec.decode(result.particles, field="particles"), local.particles)
    log_weights = codec.decode(result.log_weights, field="log_weights")
    assert log_weights.dtype == torch.float64  # the kernel's own, unrounded
    assert torch.equal(log_weights, local.log_weights)
    assert result.log_evidence == local.log_evidence
    assert result.best_index == local.best_index
    revisions = {s.host.models.current.revision for s in served}
    assert [r.name for r in result.experts] == ["a", "b", "linear", "half_space"]
    assert {r.revision for r in result.experts} == revisions
    assert all(list(r.revisions) == [r.revision] for r in result.experts)
    assert all(len(s.host.handles) == 0 for s in served)


def test_unset_settings_take_defaults_and_the_paper_preset(loop: LoopThread) -> None:
    served = loop.serve(Gaussian())
    sampler = loop.sampler()
    channel, stub = _stub(sampler)
    request = sampler_pb2.GenerateRequest(
        factors=[sampler_pb2.FactorSpec(address=served.address)], sample_shape=[2], seed=3,
        settings=sampler_pb2.SamplerSettings(num_particles=4, num_steps=3, preset="paper"),
    )  # fmt: skip
    with channel:
        levels, result = _split(list(stub.Generate(request)))
    local = sample(
        [Factor(Gaussian())], (2,), SamplerSettings.paper(num_particles=4, num_steps=3),
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert all(lv.resampled for lv in levels)  # the paper resamples at every level
    assert torch.equal(codec.decode(result.particles, field="p"), local.particles)


class _Meeting(Gaussian):
    """A Gaussian whose velocity calls each mark ``name`` arrived and then wait for ``other``:
    two jobs that each call one of a pair pass only while both are running; jobs run one after
    the other would leave the first waiting until ``timeout`` and then failing."""

    def __init__(self, name: str, other: str, arrived: dict[str, threading.Event]) -> None:
        super().__init__(name=name)
        self.other, self.arrived = other, arrived

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.arrived[self.name].set()
        if not self.arrived[self.other].wait(scaled(20)):
            raise RuntimeError(f"{self.other!r} never called: the jobs did not overlap")
        return super().velocity(x, sigma)


def test_two_jobs_run_at_once(loop: LoopThread) -> None:
    """Job A calls only expert a, job B only expert b, and each expert answers only after the
    other has been called: both results come back only if the jobs ran at the same time (with
    ``max_jobs=1`` the same test fails: A's expert gives up waiting and A fails)."""
    arrived = {"a": threading.Event(), "b": threading.Event()}
    served = {n: loop.serve(_Meeting(n, o, arrived)) for n, o in (("a", "b"), ("b", "a"))}
    sampler = loop.sampler(SamplerServerConfig(max_jobs=2, expert_retries=0))
    channel, stub = _stub(sampler)
    requests = [_request([served[n].address], [1.0], settings={"mcmc_steps": 0}) for n in "ab"]
    with channel, ThreadPoolExecutor(2) as pool:
        calls = [
            pool.submit(lambda r=r: list(stub.Generate(r, timeout=scaled(60)))) for r in requests
        ]
        a, b = (c.result() for c in calls)
    assert a[-1].HasField("result") and b[-1].HasField("result")
    assert arrived["a"].is_set() and arrived["b"].is_set()
    # the same law and seed behind either address: the same particles
    assert a[-1].result.particles == b[-1].result.particles


def test_jobs_beyond_the_limit_wait_in_a_bounded_queue(loop: LoopThread) -> None:
    """max_jobs = 1, max_queued = 1: the second job waits, the third is refused; cancelling the
    first hands its slot to the second, which runs to its result; a waiting call that leaves
    gives its place back."""
    served = loop.serve(Gaussian(delay_s=0.1))
    sampler = loop.sampler(SamplerServerConfig(max_jobs=1, max_queued=1))
    slots = sampler.host.servicer.jobs
    channel, stub = _stub(sampler)
    request = _request([served.address], [1.0])
    short = _request([served.address], [1.0], settings={"mcmc_steps": 0})
    with channel:
        running = stub.Generate(request)
        next(running)
        waiting = stub.Generate(short)
        assert wait_until(lambda: slots.waiting() == 1, timeout=scaled(10))
        assert stream_failure(stub.Generate(short)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "request",
        )
        running.cancel()
        replies = list(waiting)  # it got the slot: levels, then the result
        assert replies[-1].HasField("result") and replies[1].HasField("level")
        # a waiting call that is cancelled leaves the queue
        running = stub.Generate(request)
        next(running)
        leaving = stub.Generate(short)
        assert wait_until(lambda: slots.waiting() == 1, timeout=scaled(10))
        leaving.cancel()
        assert wait_until(lambda: slots.waiting() == 0, timeout=scaled(10))
        running.cancel()
        assert wait_until(lambda: not slots.running(), timeout=scaled(10))
        assert list(stub.Generate(short))[-1].HasField("result")


def test_cancelling_the_stream_stops_the_job(loop: LoopThread) -> None:
    counter = Counter()
    served = loop.serve(CountingGaussian(delay_s=0.02, counter=counter))
    sampler = loop.sampler()
    channel, stub = _stub(sampler)
    request = _request([served.address], [1.0], settings={"num_steps": 200})
    request.factors[0].condition.CopyFrom(expert_pb2.Condition(scalars={"shift": 0.5}))
    with channel:
        call = stub.Generate(request)
        assert next(call).HasField("job") and next(call).HasField("level")
        assert len(served.host.handles) == 1
        call.cancel()
        assert wait_until(lambda: not sampler.host.servicer.jobs.running(), timeout=scaled(3))
        stopped = counter.calls
        time.sleep(0.3)
    assert counter.calls == stopped  # the experts receive no more calls
    assert counter.calls < 100  # far from the 200 levels × 3 calls of a full run
    assert wait_until(lambda: len(served.host.handles) == 0)  # the handle was released


def test_a_client_that_disconnects_stops_the_job(loop: LoopThread) -> None:
    counter = Counter()
    served = loop.serve(CountingGaussian(delay_s=0.02, counter=counter))
    sampler = loop.sampler()
    channel, stub = _stub(sampler)
    call = stub.Generate(_request([served.address], [1.0], settings={"num_steps": 200}))
    next(call)
    channel.close()
    assert wait_until(lambda: not sampler.host.servicer.jobs.running(), timeout=scaled(5))


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        (lambda r: r.ClearField("factors"), "INVALID_ARGUMENT", "factors"),
        (lambda r: setattr(r.factors[1], "address", ""), "INVALID_ARGUMENT", "factors[1].address"),
        (lambda r: setattr(r.settings, "num_particles", 0), "INVALID_ARGUMENT", "settings.num_particles"),
        (lambda r: setattr(r.settings, "mcmc", "gibbs"), "INVALID_ARGUMENT", "settings.mcmc"),
        (lambda r: setattr(r.settings, "preset", "fast"), "INVALID_ARGUMENT", "settings.preset"),
        (lambda r: r.settings.sigmas.extend([1.0, 1.0]), "INVALID_ARGUMENT", "settings.sigmas"),
        (lambda r: setattr(r.factors[0], "weight", math.inf), "INVALID_ARGUMENT", "factors[0].weight"),
        (lambda r: r.sample_shape.append(0), "INVALID_ARGUMENT", "sample_shape"),
        (lambda r: r.sample_shape.append(3), "INVALID_ARGUMENT", "sample_shape"),  # experts: (2,)
        (lambda r: r.factors[0].region.CopyFrom(codec.encode(torch.ones(3))),
         "INVALID_ARGUMENT", "factors[0].region.shape"),
        (lambda r: r.factors[0].condition.scalars.update({"bad": 1.0}),
         "INVALID_ARGUMENT", "factors[0].condition"),
        (lambda r: setattr(r.settings, "num_particles", 10**9), "RESOURCE_EXHAUSTED", "settings.num_particles"),
        (lambda r: setattr(r.factors[1], "address", f"127.0.0.1:{free_port()}"),
         "UNAVAILABLE", "factors[1].address"),
        (lambda r: setattr(r.factors[0], "address", "10.0.0.1:1"), "PERMISSION_DENIED", "factors[0].address"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(
    loop: LoopThread, change: object, code: str, field: str
) -> None:
    served = [loop.serve(Gaussian(name="a")), loop.serve(Gaussian(name="b"))]
    addresses = [s.address for s in served]
    allowed = tuple(addresses) if code == "PERMISSION_DENIED" else ()
    sampler = loop.sampler(SamplerServerConfig(expert_retries=0, allowed_experts=allowed))
    channel, stub = _stub(sampler)
    request = _request(addresses, [0.5, 0.5])
    change(request)  # type: ignore[operator]
    with channel:
        assert stream_failure(stub.Generate(request)) == (grpc.StatusCode[code], field)
    assert all(len(s.host.handles) == 0 for s in served)


def test_an_expert_failing_mid_job_is_named(loop: LoopThread) -> None:
    slow = loop.serve(Gaussian(delay_s=0.5, name="slow"))
    # the deadline is the subject (it expires on the 0.5 s call), not a limit: not scaled
    sampler = loop.sampler(SamplerServerConfig(expert_deadline_s=0.2, expert_retries=0))
    channel, stub = _stub(sampler)
    with channel:
        code, field = stream_failure(stub.Generate(_request([slow.address], [1.0])))
    assert (code, field) == (grpc.StatusCode.UNAVAILABLE, "factors[0].address")


def test_a_token_guards_the_sampler(loop: LoopThread) -> None:
    served = loop.serve(Gaussian())
    sampler = loop.sampler(SamplerServerConfig(token="t0ken"))
    channel, stub = _stub(sampler)
    request = _request([served.address], [1.0], settings={"num_steps": 2})
    with channel:
        assert stream_failure(stub.Generate(request))[0] == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.Generate(request, metadata=[("authorization", "Bearer t0ken")]))
    assert replies[-1].HasField("result")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_end_to_end(tmp_path: Path) -> None:
    """``poegen serve analytic`` ×2 and ``poegen sampler`` as processes, a client through them."""
    mix = dict(means=[[-1.0, 0.0], [1.0, 0.0]], covariances=[[0.5, 0.5], [0.5, 0.5]],
               weights=[0.5, 0.5], name="mix")  # fmt: skip
    reward = dict(direction=[1.0, 0.0], name="right")
    configs = [
        _write(tmp_path / "mix.yaml", {"expert": "gaussian_mixture", "params": mix}),
        _write(tmp_path / "reward.yaml", {"expert": "linear_reward", "params": reward}),
    ]
    commands = [
        ["-m", "poegen.clients.cli", "serve", "analytic", "--config", str(c), "--port", "0"]
        for c in configs
    ]
    commands.append([*_sampler_command(), "--port", "0", "--grace", "1"])
    with ThreadPoolExecutor(3) as pool:
        processes = list(pool.map(start_process, commands))
    try:
        experts, sampler = processes[:2], processes[2]
        channel = grpc.insecure_channel(f"127.0.0.1:{sampler.port}")
        with channel:
            stub = sampler_pb2_grpc.SamplerServiceStub(channel)
            request = _request([f"127.0.0.1:{p.port}" for p in experts], [1.0, 2.0])
            levels, result = _split(list(stub.Generate(request, timeout=scaled(30))))
        local = sample(
            [Factor(GaussianMixture(**mix), weight=1.0),
             Factor(AnalyticLinearReward(**reward), weight=2.0)],
            (2,), SamplerSettings(**SETTINGS), generator=torch.Generator().manual_seed(11),
        )  # fmt: skip
        assert len(levels) == len(local.trace)
        assert torch.equal(codec.decode(result.particles, field="p"), local.particles)
        assert [r.name for r in result.experts] == ["mix", "right"]
    finally:
        for p in processes:
            p.proc.send_signal(signal.SIGTERM)  # all at once: each drains in about a second
        codes = [p.proc.wait(scaled(20)) for p in processes]
    assert codes == [0, 0, 0]


def _sampler_command() -> list[str]:
    from poegen.clients import cli

    if "poegen.clients.sampler_cli" in cli.COMMANDS:
        return ["-m", "poegen.clients.cli", "sampler"]
    return ["-m", "poegen.clients.sampler_cli"]  # until cli.COMMANDS registers it


def test_a_float64_result_crosses_unrounded(loop: LoopThread) -> None:
    """Particles of a float64 job and the log-weights go out as DTYPE_F64, bit for bit."""
    from poegen.kernel.remote import RemoteExpert
    from poegen.kernel.service import generate_result

    served = [loop.serve(e) for e, _ in _experts()]
    remotes = [RemoteExpert.connect(s.address) for s in served]
    try:
        factors = [Factor(r, weight=w) for r, (_, w) in zip(remotes, _experts(), strict=True)]
        result = sample(
            factors, (2,), SamplerSettings(**SETTINGS), dtype=torch.float64,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        reply = generate_result(result, factors, remotes).result
    finally:
        for r in remotes:
            r.close()
    local = sample(
        [Factor(e, weight=w) for e, w in _experts()], (2,), SamplerSettings(**SETTINGS),
        dtype=torch.float64, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    wire = sampler_pb2.GenerateResult.FromString(reply.SerializeToString())
    particles = codec.decode(wire.particles, field="particles")
    assert wire.particles.dtype == wire.log_weights.dtype == tensor_pb2.DTYPE_F64
    assert torch.equal(particles, result.particles)
    assert torch.equal(particles, local.particles)  # remote f64 experts = in-process ones
    assert torch.equal(codec.decode(wire.log_weights, field="w"), result.log_weights)


def test_records_keep_every_revision_first_seen_first() -> None:
    from poegen.kernel.service import generate_result

    class Swapped:
        revisions_seen = ("inst.1", "inst.2")

        def describe(self) -> ExpertInfo:
            return ExpertInfo(name="g", kind=ExpertKind.GENERATIVE, model_id="m", revision="inst.1")

    result = sample([Factor(Gaussian())], (2,), SamplerSettings(num_particles=2, num_steps=2),
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    reply = generate_result(result, [Factor(Gaussian())], [Swapped()])  # type: ignore[list-item]
    (record,) = reply.result.experts
    assert (record.revision, list(record.revisions)) == ("inst.1", ["inst.1", "inst.2"])


def test_settings_from_proto_maps_every_field() -> None:
    from poegen.kernel.service import settings_from_proto

    proto_fields = {f.name for f in sampler_pb2.SamplerSettings.DESCRIPTOR.fields} - {"preset"}
    assert proto_fields <= set(SamplerSettings.model_fields)
    msg = sampler_pb2.SamplerSettings(
        num_particles=5, sigmas=[1.0, 0.5, 0.1], mcmc="mala", max_batch=0, tempering="adaptive"
    )
    s = settings_from_proto(msg)
    assert (s.num_particles, s.sigmas, s.num_steps, s.mcmc) == (5, (1.0, 0.5, 0.1), 2, "mala")
    assert s.max_batch is None and s.tempering == "adaptive"
    assert s.resampling == SamplerSettings().resampling  # unset: the default


def test_threads_are_not_leaked(loop: LoopThread) -> None:
    served = loop.serve(Gaussian())
    sampler = loop.sampler()
    before = threading.active_count()
    channel, stub = _stub(sampler)
    with channel:
        for _ in range(3):
            list(stub.Generate(_request([served.address], [1.0], settings={"num_steps": 2})))
    assert wait_until(lambda: threading.active_count() <= before + 2)
