"""RemoteExpert against real expert hosts on 127.0.0.1: identity with in-process experts,
concurrency, retries, deadlines, errors with their field, dtypes, tokens, shared memory."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from helpers.remote import Counter, CountingGaussian, Jitter, LoopThread, free_port, wait_until
from helpers.server_experts import Gaussian, HalfSpace
from helpers.timing import scaled

from poegen.expert_servers.analytic import GaussianMixture, LinearReward
from poegen.expert_servers.analytic import HalfSpace as AnalyticHalfSpace
from poegen.expert_servers.server import ServerConfig
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, ExpertKind
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError, RetryPolicy
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2


def _analytic() -> list[tuple[object, float]]:
    """Two generative mixtures, a discriminative reward, two constraints (one projects, one
    proposes), with their weights."""
    return [
        (GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [0.3, 0.7],
                         name="mix", max_batch=16), 0.6),
        (GaussianMixture([[0.0, 1.0]], [[2.0, 2.0]], [1.0], name="wide"), 0.4),
        (LinearReward([1.0, 0.5], name="reward"), 2.0),
        (AnalyticHalfSpace([0.0, -1.0], 1.5, name="above"), 1.0),
        (HalfSpace(), 1.0),
        (Jitter(), 1.0),
    ]  # fmt: skip


@pytest.mark.parametrize("mcmc", ["ula", "mala"])
def test_remote_gives_identical_samples_to_in_process(loop: LoopThread, mcmc: str) -> None:
    settings = SamplerSettings(
        num_particles=48, num_steps=8, mcmc_steps=2, mcmc=mcmc, ess_threshold=0.7
    )
    local = sample(
        [Factor(e, weight=w) for e, w in _analytic()], (2,), settings,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    served = [loop.serve(e) for e, _ in _analytic()]
    remotes = [RemoteExpert.connect(s.address) for s in served]
    try:
        weights = [w for _, w in _analytic()]
        remote = sample(
            [Factor(r, weight=w) for r, w in zip(remotes, weights, strict=True)], (2,), settings,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
    finally:
        for r in remotes:
            r.close()
    assert torch.equal(local.particles, remote.particles)
    assert torch.equal(local.log_weights, remote.log_weights)
    assert local.log_evidence == remote.log_evidence
    assert local.best_index == remote.best_index
    assert any(t.resampled for t in remote.trace)  # the resampling path was exercised
    assert all(len(r.revisions_seen) == 1 for r in remotes)
    assert [rec.revision for rec in remote.experts][:2] == [
        r.revisions_seen[0] for r in remotes[:2]
    ]


def test_describe_maps_the_servers_answer(loop: LoopThread) -> None:
    mix = GaussianMixture([[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], [1.0], name="m", max_batch=8)
    served = loop.serve(mix, model_id="analytic")
    with RemoteExpert.connect(served.address) as remote:
        info = remote.describe()
    assert info.name == "m"
    assert info.kind == ExpertKind.GENERATIVE
    assert info.capabilities == frozenset({Capability.LOG_PROB, Capability.SCORE, Capability.VJP})
    assert info.sample_shape == (3,)
    assert info.max_batch == 8
    assert info.model_id == "analytic"
    assert info.revision == served.host.models.current.revision


def test_max_batch_respects_the_message_size_limit(loop: LoopThread) -> None:
    served = loop.serve(Gaussian(tuple([0.0] * 4096), max_batch=None),
                        ServerConfig(max_message_bytes=1 << 20))  # fmt: skip
    with RemoteExpert.connect(served.address) as remote:
        limit = remote.describe().max_batch
        assert limit is not None and limit * 4096 * 4 < 1 << 20
        result = sample([Factor(remote)], (4096,), SamplerSettings(num_particles=3 * limit,
                        num_steps=2, mcmc_steps=0), generator=torch.Generator())  # fmt: skip
    assert result.trace[-1].experts["gaussian"].calls % 3 == 0  # three chunks per round


def test_three_experts_cost_the_slowest_not_the_sum(loop: LoopThread) -> None:
    delay = 0.2
    served = [loop.serve(Gaussian((0.0, 0.0), delay_s=delay, name=f"g{i}")) for i in range(3)]
    remotes = [RemoteExpert.connect(s.address) for s in served]
    try:
        result = sample(
            [Factor(r, weight=1 / 3) for r in remotes], (2,),
            SamplerSettings(num_particles=4, num_steps=3, mcmc_steps=0),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        for r in remotes:
            r.close()
    # one level = one round of three velocity calls; in sequence it would take 3 × delay
    # (level 0 also pays the initial evaluation at σ = 1)
    level = result.trace[1]
    assert all(stats.calls == 1 for stats in level.experts.values())
    assert level.seconds < 0.7 * 3 * delay, level.seconds


def test_retries_until_the_server_is_up(loop: LoopThread) -> None:
    port = free_port()
    got: dict[str, object] = {}

    def client() -> None:
        try:
            with RemoteExpert.connect(
                f"127.0.0.1:{port}", retries=20, backoff_s=0.05, max_backoff_s=0.2
            ) as r:
                got["v"] = r.velocity(torch.zeros(2, 2), torch.full((2,), 0.5))
        except Exception as e:  # reported below
            got["error"] = e

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.4)  # the client is retrying now
    loop.serve(Gaussian(), ServerConfig(port=port))
    thread.join(scaled(20))
    assert "error" not in got, got.get("error")
    assert got["v"].shape == (2, 2)


def test_survives_a_restart_and_prepares_its_condition_again(loop: LoopThread) -> None:
    port = free_port()
    first = loop.serve(Gaussian(), ServerConfig(port=port))
    condition = expert_pb2.Condition(scalars={"shift": 1.0})
    x, sigma = torch.zeros(3, 2), torch.full((3,), 0.5)
    with RemoteExpert.connect(
        first.address, condition=condition, retries=20, backoff_s=0.05, max_backoff_s=0.2
    ) as remote:
        before = remote.velocity(x, sigma)
        old_handle = remote.handle
        first.stop()
        restarted = threading.Timer(0.3, lambda: loop.serve(Gaussian(), ServerConfig(port=port)))
        restarted.start()
        after = remote.velocity(x, sigma)  # UNAVAILABLE, retried; then NOT_FOUND handle
        restarted.join()
        assert torch.equal(before, after)  # the same condition, prepared again
        assert remote.handle != old_handle
        assert len(remote.revisions_seen) == 2  # a new host process revision


def test_unavailable_after_the_retries_says_so() -> None:
    started = time.monotonic()
    with pytest.raises(RemoteExpertError) as err:
        RemoteExpert.connect(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)
    assert err.value.code == Code.UNAVAILABLE
    assert "3 attempt" in err.value.reason
    assert err.value.method == "Describe"
    assert time.monotonic() - started < scaled(10)


def test_deadline_exceeded_surfaces_clearly(loop: LoopThread) -> None:
    served = loop.serve(Gaussian(delay_s=1.0))
    with RemoteExpert.connect(served.address) as remote, pytest.raises(RemoteExpertError) as err:
        # the deadline is the subject, not a limit (not scaled); connect (Describe) without it:
        # a loaded machine may be slow
        remote.deadline_s = 0.2
        remote.velocity(torch.zeros(1, 2), torch.full((1,), 0.5))
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert "deadline_s=0.2" in str(err.value)
    assert "Velocity" in str(err.value) and served.address in str(err.value)


@pytest.mark.parametrize(
    ("x", "sigma", "code", "field"),
    [
        (torch.zeros(2, 3), torch.full((2,), 0.5), Code.INVALID_ARGUMENT, "x.shape"),
        (torch.zeros(2, 2), torch.full((2,), 1.5), Code.INVALID_ARGUMENT, "sigma"),
        (torch.zeros(2, 2), torch.full((3,), 0.5), Code.INVALID_ARGUMENT, "sigma.shape"),
        (torch.full((2, 2), torch.nan), torch.full((2,), 0.5), Code.INVALID_ARGUMENT, "x"),
        (torch.zeros(9, 2), torch.full((9,), 0.5), Code.RESOURCE_EXHAUSTED, "x.shape"),
    ],
)  # fmt: skip
def test_server_errors_keep_code_and_field(
    loop: LoopThread, x: torch.Tensor, sigma: torch.Tensor, code: Code, field: str
) -> None:
    served = loop.serve(Gaussian(max_batch=8))
    with RemoteExpert.connect(served.address) as remote, pytest.raises(ExpertError) as err:
        remote.velocity(x, sigma)
    assert (err.value.code, err.value.field) == (code, field)


def test_a_bad_condition_fails_connect_with_its_field(loop: LoopThread) -> None:
    served = loop.serve(Gaussian())
    bad = expert_pb2.Condition(scalars={"temperature": 1.0})
    with pytest.raises(RemoteExpertError) as err:
        RemoteExpert.connect(served.address, condition=bad)
    assert err.value.code == Code.INVALID_ARGUMENT
    assert err.value.field == "condition"
    assert err.value.method == "Prepare"


def test_the_kernel_reports_the_field_of_a_remote_error(loop: LoopThread) -> None:
    served = loop.serve(Gaussian((0.0, 0.0, 0.0)))
    # the expert says (3,), the kernel is told (2,): the kernel refuses before any call
    with (
        RemoteExpert.connect(served.address) as remote,
        pytest.raises(ValueError, match="sample_shape"),
    ):
        sample([Factor(remote)], (2,), SamplerSettings(num_particles=2, num_steps=2),
               generator=torch.Generator())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip(loop: LoopThread, dtype: torch.dtype) -> None:
    expert = Gaussian((0.5, -0.5), max_batch=None)
    served = loop.serve(expert)
    x = torch.linspace(-2, 2, 8, dtype=dtype).reshape(4, 2)
    sigma = torch.full((4,), 0.25, dtype=dtype)
    with RemoteExpert.connect(served.address) as remote:
        v = remote.velocity(x, sigma)
        lp = remote.log_prob(x, sigma)
    assert v.dtype == dtype and v.shape == x.shape
    # every dtype crosses unchanged (float64 included): the expert sees the very same bits
    assert torch.equal(v, expert.velocity(x, sigma))
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:  # computed in float64 on the server, not rounded to float32
        assert torch.equal(lp, expert.log_prob(x, sigma))


def test_bearer_token(loop: LoopThread) -> None:
    served = loop.serve(Gaussian(), ServerConfig(token="s3cret"))
    with pytest.raises(RemoteExpertError) as err:
        RemoteExpert.connect(served.address)
    assert err.value.code == Code.UNAUTHENTICATED
    with RemoteExpert.connect(served.address, token="s3cret") as remote:
        assert remote.describe().name == "gaussian"


def test_shared_memory_gives_the_same_replies(
    loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    rooms = _count_room_writes(monkeypatch)
    expert = Gaussian(tuple([0.1] * 4096), max_batch=None)
    served = loop.serve(expert, ServerConfig(shared_memory=True))
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))  # 128 KiB
    sigma = torch.full((8,), 0.5)
    with RemoteExpert.connect(served.address, shared_memory=True) as shm, \
            RemoteExpert.connect(served.address) as inline:  # fmt: skip
        v = shm.velocity(x, sigma)
        assert rooms == [1]  # the reply came through the room the client offered
        assert torch.equal(v, inline.velocity(x, sigma)) and rooms == [1]
        assert torch.equal(v, expert.velocity(x, sigma))
        v += 1  # a private copy: the pool's memory is reused by the next call
        assert torch.equal(shm.velocity(x, sigma), expert.velocity(x, sigma))
        assert shm.uses_shared_memory and not inline.uses_shared_memory
        assert len(shm._all_pools) == 1  # reused across calls
    # a server that did not opt in is never sent shared-memory tensors
    plain = loop.serve(expert)
    with RemoteExpert.connect(plain.address, shared_memory=True) as remote:
        assert not remote.uses_shared_memory
        assert remote.velocity(x, sigma).shape == x.shape


def _count_room_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the server's writes of replies into client rooms (the servers run in-process)."""
    from poegen.expert_servers.server import serving

    count = [0]
    real = serving.encode_into

    def counting(*args: object, **kw: object) -> object:
        count[0] += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(serving, "encode_into", counting)
    return count


def test_a_failed_call_never_reuses_its_reply_room(loop: LoopThread) -> None:
    """A call that timed out may still have its reply written late: that pool is unlinked."""
    served = loop.serve(Gaussian(tuple([0.0] * 4096), delay_s=0.5, max_batch=None),
                        ServerConfig(shared_memory=True))  # fmt: skip
    x, sigma = torch.zeros(8, 4096), torch.full((8,), 0.5)
    with RemoteExpert.connect(served.address, shared_memory=True, deadline_s=0.2,
                              retries=0) as remote:  # fmt: skip
        with pytest.raises(RemoteExpertError) as err:
            remote.velocity(x, sigma)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert remote._all_pools == [] and remote._pools == []


def test_float64_batches_too_large_for_one_message_are_chunked(loop: LoopThread) -> None:
    counter = Counter()
    served = loop.serve(CountingGaussian(tuple([0.5] * 4096), max_batch=None, counter=counter),
                        ServerConfig(max_message_bytes=1 << 20))  # fmt: skip
    with RemoteExpert.connect(served.address) as remote:
        limit = remote.describe().max_batch  # counts float32 samples
        assert limit is not None and limit * 4096 * 8 > 1 << 20  # float64 would not fit
        x = torch.randn(limit, 4096, dtype=torch.float64, generator=torch.Generator())
        sigma = torch.full((limit,), 0.5, dtype=torch.float64)
        v = remote.velocity(x, sigma)
    assert counter.calls >= 2  # each chunk fits the limit
    assert torch.equal(v, Gaussian(tuple([0.5] * 4096)).velocity(x, sigma))


def test_cancel_stops_calls_in_flight(loop: LoopThread) -> None:
    served = loop.serve(Gaussian(delay_s=2.0))
    with RemoteExpert.connect(served.address) as remote:
        errors: list[BaseException] = []

        def call() -> None:
            try:
                remote.velocity(torch.zeros(1, 2), torch.full((1,), 0.5))
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=call)
        started = time.monotonic()
        thread.start()
        time.sleep(0.2)
        remote.cancel()
        thread.join(scaled(5))
        assert time.monotonic() - started < 1.5  # the subject: before the 2 s call ends
        with pytest.raises(RemoteExpertError) as later:
            remote.velocity(torch.zeros(1, 2), torch.full((1,), 0.5))
    assert errors and errors[0].code == Code.CANCELLED
    assert later.value.code == Code.CANCELLED


def test_close_releases_the_handle(loop: LoopThread) -> None:
    served = loop.serve(Gaussian())
    remote = RemoteExpert.connect(served.address, condition=expert_pb2.Condition())
    assert remote.handle and len(served.host.handles) == 1
    remote.close()
    remote.close()  # idempotent
    assert wait_until(lambda: len(served.host.handles) == 0)


def test_close_after_cancel_still_releases_the_handle(loop: LoopThread) -> None:
    """cancel() closes the channel (that is what stops blocking calls in flight); close()
    then releases the handle through a channel of its own."""
    served = loop.serve(Gaussian())
    remote = RemoteExpert.connect(served.address, condition=expert_pb2.Condition())
    assert len(served.host.handles) == 1
    remote.cancel()
    with pytest.raises(RemoteExpertError) as refused:
        remote.velocity(torch.zeros(1, 2), torch.full((1,), 0.5))
    assert refused.value.code == Code.CANCELLED
    remote.close()
    assert wait_until(lambda: len(served.host.handles) == 0)


def test_retry_policy_jitter_is_seeded_and_bounded() -> None:
    policy = RetryPolicy(retries=5, backoff_s=0.1, max_backoff_s=0.5)
    a = [policy.delay(k, random.Random(3)) for k in range(6)]
    b = [policy.delay(k, random.Random(3)) for k in range(6)]
    assert a == b
    for k, d in enumerate(a):
        cap = min(0.5, 0.1 * 2**k)
        assert cap / 2 <= d <= cap
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
