"""Dynamic batching in the expert host (``server.batching``): real hosts, real gRPC clients.

Which calls meet in one forward pass must not depend on the machine's speed, so the experts
here are *gated*: each forward pass waits for a permit the test hands out (a long GPU step
that the test ends, instead of a clock). A first call holds the gate; the calls sent while it
runs wait in the batcher (``poegen_batch_waiting_calls`` says how many) and, once the gate
opens, run as one batch, observed through ``poegen_merged_batch_calls``/``_rows``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from helpers.server import REPO, collect, rpc_error, run, running, start_process
from helpers.server_experts import Gaussian
from helpers.timing import scaled
from torch import Tensor

from poegen.expert_servers.analytic import GaussianMixture
from poegen.expert_servers.server import ConfigError, ModelRef, ServedModel, ServerConfig
from poegen.expert_servers.server.adapter import Progress
from poegen.expert_servers.server.cli import ServeRequest, plan
from poegen.expert_servers.server.config import load_server_config, parse_server_config
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import ExpertInfo
from poegen.kernel.remote import RemoteExpert
from poegen.v1 import expert_pb2 as pb

# which calls meet is settled while the gate is closed (their key is busy, so no timer runs);
# once it opens, a group waits this long for the callers of the batch before it, then goes
DELAY_MS = 20.0
ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)


class Gate:
    """Permits for forward passes; counts the passes that entered and their rows."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.rows: list[int] = []  # rows of each forward pass that entered, in order

    def wait(self, rows: int) -> None:
        with self._lock:
            self.rows.append(rows)
        if not self._permits.acquire(timeout=scaled(30)):
            raise RuntimeError("the test never opened the gate")

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def open(self) -> None:
        self._permits.release(10_000)

    @property
    def entered(self) -> int:
        with self._lock:
            return len(self.rows)


class GatedGaussian(Gaussian):
    """The exact Gaussian expert whose every velocity pass waits at the gate. It refuses
    samples with a coordinate above 1e3 itself (the host cannot know: an adapter's own check),
    so a merged batch holding one such call fails and is run again call by call."""

    def __init__(self, mean: tuple[float, ...], gate: Gate, **kw: Any) -> None:
        super().__init__(mean, **kw)
        self.gate = gate

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.gate.wait(int(x.shape[0]))
        if bool((x.abs() > 1e3).any()):
            raise ExpertError.invalid("x", "outside the support of this expert")
        return super().velocity(x, sigma)


class GatedExpert:
    """Any expert (here the real FLUX expert) behind a gate; all but velocity delegated."""

    def __init__(self, expert: Any, gate: Gate) -> None:
        self.expert = expert
        self.gate = gate

    def __getattr__(self, name: str) -> Any:  # schedule, encode, decode, …
        return getattr(self.expert, name)

    def describe(self) -> ExpertInfo:
        return self.expert.describe()

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.gate.wait(int(x.shape[0]))
        return self.expert.velocity(x, sigma)


class GatedFileAdapter:
    """Loads ``{mean: [...]}`` YAML files as gated Gaussians, one gate per load."""

    def __init__(self) -> None:
        self.gates: list[Gate] = []

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        assert ref.path is not None
        spec = yaml.safe_load(ref.path.read_text())
        self.gates.append(Gate())
        return ServedModel(GatedGaussian(tuple(spec["mean"]), self.gates[-1]))


def _quiet(fraction: float, message: str) -> None:
    del fraction, message  # load progress: not needed here


def _x(rows: int, offset: float, dim: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    return (torch.arange(rows * dim, dtype=torch.float64).reshape(rows, dim) / 7 + offset).to(dtype)


def _sigma(rows: int, offset: float = 0.0) -> Tensor:
    return torch.linspace(0.2, 0.9, rows) * (1 - offset) + offset * 0.5


def _request(x: Tensor, sigma: Tensor, **kw: Any) -> pb.VelocityRequest:
    return pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma), **kw)


async def _velocity(stub: Any, x: Tensor, sigma: Tensor, **kw: Any) -> tuple[Tensor, str]:
    reply = await stub.Velocity(_request(x, sigma, **kw))
    return codec.decode(reply.velocity, field="velocity"), reply.revision


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + scaled(20)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _metric(host: Any, name: str, method: str | None = None) -> float:
    labels = {"method": method} if method else {}
    return host.metrics.registry.get_sample_value(name, labels) or 0.0


def _waiting(host: Any) -> float:
    return _metric(host, "poegen_batch_waiting_calls")


def _passes(host: Any, method: str = "Velocity") -> tuple[float, float, float]:
    """(forward passes, calls they answered, rows they computed) for ``method``."""
    return (
        _metric(host, "poegen_merged_batch_calls_count", method),
        _metric(host, "poegen_merged_batch_calls_sum", method),
        _metric(host, "poegen_merged_batch_rows_sum", method),
    )


def _config(**kw: Any) -> ServerConfig:
    return ServerConfig(batch_delay_ms=DELAY_MS, **kw)


async def _hold(stub: Any, gate: Gate, rows: int = 1) -> asyncio.Task[tuple[Tensor, str]]:
    """A first call that holds the gate, so that the next calls of its key wait for it."""
    task = asyncio.create_task(_velocity(stub, _x(rows, -3.0), _sigma(rows)))
    await _until(lambda: gate.entered == 1, "the first call at the gate")
    return task


def test_concurrent_calls_merge_and_each_caller_gets_exactly_its_rows() -> None:
    gate = Gate()
    expert = GatedGaussian((1.0, -2.0), gate)

    async def body() -> None:
        async with running(_config(), expert=expert) as server:
            first = await _hold(server.stub, gate)
            inputs = [(_x(rows, i), _sigma(rows, 0.1 * i)) for i, rows in enumerate((2, 3, 1))]
            calls = [asyncio.create_task(_velocity(server.stub, x, s)) for x, s in inputs]
            await _until(lambda: _waiting(server.host) == 3, "three calls waiting")
            assert gate.entered == 1, "a waiting call ran beside the one holding the gate"
            gate.open()
            replies = await asyncio.gather(*calls)
            await first
            assert gate.rows == [1, 6]  # the first call, then the three in one pass
            assert _passes(server.host) == (2.0, 4.0, 7.0)
        async with running(ServerConfig(), expert=Gaussian((1.0, -2.0))) as unbatched:
            for (x, s), (v, revision) in zip(inputs, replies, strict=True):
                assert revision
                # the Gaussian's formula is row-wise in float64: merged = separate, bit for bit
                alone, _ = await _velocity(unbatched.stub, x, s)
                assert torch.equal(v, alone)
                assert torch.equal(v, Gaussian((1.0, -2.0)).velocity(x, s))

    run(body())


def test_a_lone_caller_never_waits_for_the_delay() -> None:
    """One job alone on the host: each call runs at once (rule 2, its key's last batch had one
    caller), so a deadline of half the delay is never missed."""
    config = ServerConfig(batch_delay_ms=10_000)

    async def body() -> None:
        async with running(config, expert=Gaussian((0.0, 0.0))) as server:
            for i in range(5):
                x, s = _x(3, i), _sigma(3)
                reply = await server.stub.Velocity(_request(x, s), timeout=5.0)
                v = codec.decode(reply.velocity, field="velocity")
                assert torch.equal(v, Gaussian((0.0, 0.0)).velocity(x, s))
            assert _passes(server.host) == (5.0, 5.0, 15.0)

    run(body())


def test_calls_that_cannot_share_a_pass_are_not_merged() -> None:
    gate = Gate()
    expert = GatedGaussian((0.5, 0.5), gate)

    async def body() -> None:
        async with running(_config(), expert=expert) as server:
            prepared = await server.stub.Prepare(
                pb.PrepareRequest(condition=pb.Condition(scalars={"shift": 1.0}))
            )
            first = await _hold(server.stub, gate)
            same = [
                asyncio.create_task(_velocity(server.stub, _x(2, i), _sigma(2))) for i in (1, 2)
            ]
            await _until(lambda: _waiting(server.host) == 2, "two calls of the held key waiting")
            # another handle, another dtype, another method: other keys, answered at once
            shifted, _ = await _velocity(server.stub, _x(2, 1), _sigma(2), handle=prepared.handle)
            x64 = _x(2, 1, dtype=torch.float64)
            wide = asyncio.create_task(_velocity(server.stub, x64, _sigma(2).double()))
            await _until(lambda: gate.entered == 2, "the float64 call at the gate, alone")
            log_prob = await server.stub.LogProb(
                pb.LogProbRequest(x=codec.encode(_x(2, 1)), sigma=codec.encode(_sigma(2)))
            )
            assert _waiting(server.host) == 2 and not any(t.done() for t in same)
            torch.testing.assert_close(
                shifted, Gaussian((1.5, 1.5)).velocity(_x(2, 1), _sigma(2)), rtol=0, atol=0
            )
            assert codec.decode(log_prob.log_prob, field="log_prob").shape == (2,)
            gate.open()
            v64, _ = await wide
            assert torch.equal(v64, Gaussian((0.5, 0.5)).velocity(x64, _sigma(2).double()))
            await asyncio.gather(first, *same)
            # passes: the first, the shifted handle's (ungated view), the float64 one, the pair
            assert gate.rows == [1, 2, 4]
            assert _passes(server.host) == (4.0, 5.0, 9.0)
            assert _passes(server.host, "LogProb") == (1.0, 1.0, 2.0)

    run(body())


def test_a_bad_request_among_concurrent_good_ones_fails_alone() -> None:
    gate = Gate()
    expert = GatedGaussian((0.0, 1.0), gate, max_batch=8)

    async def body() -> None:
        async with running(_config(), expert=expert) as server:
            first = await _hold(server.stub, gate)
            good = [(_x(2, i), _sigma(2)) for i in (1, 2)]
            calls = [asyncio.create_task(_velocity(server.stub, x, s)) for x, s in good]
            nan = _x(2, 0).clone()
            nan[1, 0] = float("nan")
            refused = [
                (_request(nan, _sigma(2)), grpc.StatusCode.INVALID_ARGUMENT, "x"),
                (_request(_x(2, 0), torch.tensor([0.5, 1.5])), grpc.StatusCode.INVALID_ARGUMENT,
                 "sigma"),
                (_request(_x(9, 0), _sigma(9)), grpc.StatusCode.RESOURCE_EXHAUSTED, "x.shape"),
                (_request(_x(2, 0, dim=3), _sigma(2)), grpc.StatusCode.INVALID_ARGUMENT,
                 "x.shape"),
            ]  # fmt: skip
            for request, code, field in refused:  # refused before they could meet anyone
                got, error = await rpc_error(server.stub.Velocity(request))
                assert (got, error.field if error else None) == (code, field)
            # the expert itself refuses this one: it is merged, the pass fails, and the calls
            # run again one by one, so only its caller sees the error
            outside = asyncio.create_task(_velocity(server.stub, _x(2, 5e3), _sigma(2)))
            await _until(lambda: _waiting(server.host) == 3, "three calls waiting")
            gate.open()
            got, error = await rpc_error(outside)
            assert got == grpc.StatusCode.INVALID_ARGUMENT and error and error.field == "x"
            for (x, s), (v, _) in zip(good, await asyncio.gather(*calls), strict=True):
                assert torch.equal(v, Gaussian((0.0, 1.0)).velocity(x, s))
            await first
            assert gate.rows == [1, 6, 2, 2, 2]  # the first; the merged pass; each alone

    run(body())


def test_a_cancelled_caller_does_not_hurt_the_others() -> None:
    gate = Gate()
    expert = GatedGaussian((2.0, 0.0), gate)

    async def body() -> None:
        async with running(_config(), expert=expert) as server:
            first = await _hold(server.stub, gate)
            inputs = [(_x(2, i), _sigma(2)) for i in range(4)]
            calls = [server.stub.Velocity(_request(x, s)) for x, s in inputs]
            tasks = [asyncio.ensure_future(call) for call in calls]
            await _until(lambda: _waiting(server.host) == 4, "four calls waiting")
            calls[1].cancel()  # while it waits for its batch
            await _until(lambda: _waiting(server.host) == 3, "the cancelled call gone")
            gate.allow(1)  # the first call ends; the three left run as one pass
            await _until(lambda: gate.entered == 2, "the merged pass at the gate")
            calls[3].cancel()  # while its batch runs
            with pytest.raises(asyncio.CancelledError):
                await tasks[3]
            gate.open()
            await first
            for i in (0, 2):
                v = codec.decode((await tasks[i]).velocity, field="velocity")
                assert torch.equal(v, Gaussian((2.0, 0.0)).velocity(*inputs[i]))
            with pytest.raises(asyncio.CancelledError):
                await tasks[1]
            assert gate.rows == [1, 6]
            # the host serves on (a LogProb: the Velocity key would wait for three callers)
            x, sigma = inputs[1]
            reply = await server.stub.LogProb(
                pb.LogProbRequest(x=codec.encode(x), sigma=codec.encode(sigma))
            )
            expected = Gaussian((2.0, 0.0)).log_prob(x, sigma).float()
            assert torch.equal(codec.decode(reply.log_prob, field="log_prob"), expected)

    run(body())


def test_a_merged_batch_never_exceeds_max_batch() -> None:
    gate = Gate()
    expert = GatedGaussian((1.0, 1.0), gate, max_batch=8)

    async def body() -> None:
        async with running(_config(), expert=expert) as server:
            first = await _hold(server.stub, gate)
            inputs = [(_x(3, i), _sigma(3)) for i in range(4)]
            calls = [asyncio.create_task(_velocity(server.stub, x, s)) for x, s in inputs]
            # 3 + 3 rows fill a group as far as 8 allows: the third call starts the next group
            await _until(
                lambda: gate.entered == 2 and _waiting(server.host) == 2, "groups of two calls"
            )
            gate.open()
            for (x, s), (v, _) in zip(inputs, await asyncio.gather(*calls), strict=True):
                assert torch.equal(v, Gaussian((1.0, 1.0)).velocity(x, s))
            await first
            assert sorted(gate.rows) == [1, 6, 6]

    run(body())


def test_calls_waiting_for_their_batch_count_against_the_inflight_limit() -> None:
    gate = Gate()
    expert = GatedGaussian((1.0, 1.0), gate)

    async def body() -> None:
        async with running(_config(max_inflight_calls=3), expert=expert) as server:
            first = await _hold(server.stub, gate)
            waiting = [
                asyncio.create_task(_velocity(server.stub, _x(2, i), _sigma(2))) for i in (1, 2)
            ]
            await _until(lambda: _waiting(server.host) == 2, "two calls waiting")
            code, error = await rpc_error(server.stub.Velocity(_request(_x(2, 3), _sigma(2))))
            assert (code, error.field if error else None) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "request",
            )
            gate.open()
            await asyncio.gather(first, *waiting)
            assert gate.rows == [1, 4]

    run(body())


def test_a_hot_swap_during_batching_keeps_each_batch_on_one_revision(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"mean": [-1.0, 0.0]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"mean": [4.0, 4.0]}))
    adapter = GatedFileAdapter()
    config = _config(model_root=tmp_path, admin_token=ADMIN)

    async def load(stub: Any, model_id: str) -> str:
        request = pb.LoadModelRequest(model_id=model_id)
        return (await collect(stub.LoadModel(request, metadata=ADMIN_MD)))[-1].revision

    async def body() -> None:
        async with running(config, adapter=adapter) as server:
            old = await load(server.stub, "a.yaml")
            first = await _hold(server.stub, adapter.gates[0])
            inputs = [(_x(2, i), _sigma(2)) for i in range(4)]
            before = [asyncio.create_task(_velocity(server.stub, *xs)) for xs in inputs[:2]]
            await _until(lambda: _waiting(server.host) == 2, "two calls on the old model")
            new = await load(server.stub, "b.yaml")
            adapter.gates[1].open()
            after = await asyncio.gather(*(_velocity(server.stub, *xs) for xs in inputs[2:]))
            adapter.gates[0].open()
            merged = await asyncio.gather(*before)
            assert (await first)[1] == old
            for (x, s), (v, revision) in zip(inputs[:2], merged, strict=True):
                assert revision == old
                assert torch.equal(v, Gaussian((-1.0, 0.0)).velocity(x, s))
            for (x, s), (v, revision) in zip(inputs[2:], after, strict=True):
                assert revision == new
                assert torch.equal(v, Gaussian((4.0, 4.0)).velocity(x, s))
            assert adapter.gates[0].rows == [1, 4]  # the old model's pair merged

    run(body())


def test_merged_flux_rows_are_the_rows_of_the_batch_and_match_separate_calls(
    flow_models: Any,
) -> None:
    """The real FLUX adapter on a tiny model: a merged batch's rows are, bit for bit, the rows
    of the model run on the concatenated batch; against separate calls they are equal for
    callers of 4 rows or more on this CPU and within 6e-7 for 1–3 rows (oneDNN's kernels for
    small matrices), the tolerance checked here."""
    from poegen.expert_servers.flow.flux import FluxAdapter

    folder = flow_models.path("flux")
    served = FluxAdapter().load(ModelRef("flux", folder), {"max_sequence_length": "16"}, _quiet)
    flux, gate = served.expert, Gate()
    g = torch.Generator().manual_seed(0)
    inputs = [
        (torch.randn(rows, 16, 4, 4, generator=g), torch.rand(rows, generator=g) * 0.9 + 0.1)
        for rows in (1, 4, 7)
    ]

    async def body() -> None:
        async with running(_config(), expert=GatedExpert(flux, gate)) as server:
            first = asyncio.create_task(_velocity(server.stub, *inputs[1]))
            await _until(lambda: gate.entered == 1, "the first call at the gate")
            calls = [asyncio.create_task(_velocity(server.stub, x, s)) for x, s in inputs]
            await _until(lambda: _waiting(server.host) == 3, "three calls waiting")
            gate.open()
            replies = [v for v, _ in await asyncio.gather(*calls)]
            await first
            assert gate.rows == [4, 12]
        with torch.inference_mode():
            merged = flux.velocity(
                torch.cat([x for x, _ in inputs]), torch.cat([s for _, s in inputs])
            )
            alone = [flux.velocity(x, s) for x, s in inputs]
        for v, rows, single in zip(replies, merged.split([1, 4, 7]), alone, strict=True):
            assert torch.equal(v, rows)
            torch.testing.assert_close(v, single, rtol=0, atol=1e-5)

    run(body())


def test_the_batch_delay_is_validated_and_set_by_the_flag_or_the_file(tmp_path: Path) -> None:
    assert ServerConfig().batch_delay_ms == 0  # off by default
    with pytest.raises(ConfigError, match=r"server\.batch_delay_ms"):
        parse_server_config({"batch_delay_ms": -1})
    assert plan(ServeRequest("analytic", batch_delay_ms=2.5)).config.batch_delay_ms == 2.5
    # the docs' file form
    path = tmp_path / "expert.yaml"
    path.write_text("server:\n  batch_delay_ms: 2\n")
    assert load_server_config(path).batch_delay_ms == 2.0


def _metrics(text_port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(f"http://127.0.0.1:{text_port}/metrics", timeout=scaled(10)) as reply:
        return reply.read().decode()


def test_poegen_serve_with_batch_delay_answers_concurrent_remote_experts() -> None:
    """The command of the docs: ``poegen serve analytic --config examples/experts/ring.yaml
    --port 0 --metrics-port 0 --batch-delay-ms 2``, called by eight RemoteExperts at once."""
    server = start_process(
        ["-m", "poegen.clients.cli", "serve", "analytic", "--config", "examples/experts/ring.yaml",
         "--port", "0", "--metrics-port", "0", "--batch-delay-ms", "2"]
    )  # fmt: skip
    params = yaml.safe_load((REPO / "examples/experts/ring.yaml").read_text())["params"]
    ring = GaussianMixture(**params)
    inputs = [(_x(4, i / 4), _sigma(4)) for i in range(8)]
    try:
        match = re.fullmatch(
            r"poegen: metrics on 127\.0\.0\.1:(\d+)", server.proc.stdout.readline().strip()
        )
        assert match, "no metrics line"

        def job(i: int) -> list[Tensor]:
            with RemoteExpert.connect(f"127.0.0.1:{server.port}") as expert:
                return [expert.velocity(*inputs[i]) for _ in range(5)]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(job, range(8)))
        for (x, s), replies in zip(inputs, results, strict=True):
            for v in replies:
                torch.testing.assert_close(v, ring.velocity(x, s).float())
        text = _metrics(int(match.group(1)))
        # every call was answered by a pass the batcher counted (merged or alone)
        assert 'poegen_merged_batch_calls_sum{method="Velocity"} 40.0' in text
        assert "poegen_batch_waiting_calls 0.0" in text
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
