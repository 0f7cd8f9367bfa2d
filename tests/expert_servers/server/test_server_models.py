"""LoadModel: admin token, model-root checks, health, hot swap, failed loads, single flight."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.server import collect, rpc_error, run, running, tensor
from helpers.server_experts import Gaussian, GaussianFileAdapter
from helpers.timing import scaled

from poegen.expert_servers.server import ExpertFileAdapter, ModelRef, ServedModel, ServerConfig
from poegen.kernel import codec
from poegen.v1 import expert_pb2 as pb

ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)
X = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
SIGMA = torch.tensor([0.4, 0.7])


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _mixture(mean_x: float) -> dict[str, Any]:
    return {
        "expert": "gaussian_mixture",
        "params": {"means": [[mean_x, 0.0]], "covariances": [[1.0, 0.5]], "weights": [1.0]},
        "latent_space": "toy-2d",
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    _write(models / "a.yaml", _mixture(-2.0))
    _write(models / "b.yaml", _mixture(2.0))
    _write(models / "bad.yaml", {"expert": "gaussian_mixture", "params": {"means": "oops"}})
    (models / "sub").mkdir()
    _write(models / "sub" / "c.yaml", _mixture(0.0))
    return models


def _config(root: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(model_root=root, admin_token=ADMIN, **kw)


async def _load(stub: Any, model_id: str) -> list[pb.LoadModelResponse]:
    return await collect(stub.LoadModel(pb.LoadModelRequest(model_id=model_id), metadata=ADMIN_MD))


async def _velocity(stub: Any) -> tuple[torch.Tensor, str]:
    reply = await stub.Velocity(pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA)))
    return codec.decode(reply.velocity, field="v"), reply.revision


async def _health(channel: Any, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


def test_first_load_makes_the_server_serve(root: Path) -> None:
    async def body() -> None:
        async with running(_config(root), adapter=ExpertFileAdapter()) as server:
            for service in ("", "poegen.v1.ExpertService"):
                assert (
                    await _health(server.channel, service)
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
            code, _ = await rpc_error(server.stub.Describe(pb.DescribeRequest()))
            assert code == grpc.StatusCode.UNAVAILABLE
            events = await _load(server.stub, "a.yaml")
            assert events[0].stage == pb.LOAD_STAGE_LOADING
            assert events[-1].stage == pb.LOAD_STAGE_READY and events[-1].progress == 1.0
            assert len({e.revision for e in events}) == 1
            for service in ("", "poegen.v1.ExpertService"):
                assert (
                    await _health(server.channel, service) == health_pb2.HealthCheckResponse.SERVING
                )
            info = await server.stub.Describe(pb.DescribeRequest())
            assert (info.model_id, info.revision, info.latent_space) == (
                "a.yaml",
                events[-1].revision,
                "toy-2d",
            )
            _, revision = await _velocity(server.stub)
            assert revision == info.revision

    run(body())


def test_load_model_needs_the_admin_token(root: Path) -> None:
    async def body() -> None:
        async with running(_config(root), adapter=ExpertFileAdapter()) as server:
            for metadata in (
                (),
                (("x-poegen-admin-token", "wrong"),),
                (("authorization", f"Bearer {ADMIN}"),),
            ):
                stream = server.stub.LoadModel(
                    pb.LoadModelRequest(model_id="a.yaml"), metadata=metadata
                )
                code, err = await rpc_error(collect(stream))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert err is not None and err.field == "x-poegen-admin-token"
            code, _ = await rpc_error(server.stub.Describe(pb.DescribeRequest()))
            assert code == grpc.StatusCode.UNAVAILABLE  # nothing was loaded

    run(body())


@pytest.mark.parametrize(
    ("model_id", "code"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("../outside.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("sub/../../outside.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("https://example.com/model.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("file:///etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("~/model.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("sub\\..\\..\\outside.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("link_out.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("dir_out/outside.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        (".", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing.yaml", grpc.StatusCode.NOT_FOUND),
        ("sub", grpc.StatusCode.INVALID_ARGUMENT),  # a directory, not an expert file
    ],
)
def test_model_ids_outside_the_root_are_rejected(
    root: Path, model_id: str, code: grpc.StatusCode
) -> None:
    outside = _write(root.parent / "outside.yaml", _mixture(9.0))
    (root / "link_out.yaml").symlink_to(outside)
    (root / "dir_out").symlink_to(root.parent, target_is_directory=True)

    async def body() -> None:
        async with running(_config(root), adapter=ExpertFileAdapter()) as server:
            got, err = await rpc_error(_load(server.stub, model_id))
            assert got == code
            assert err is not None and err.field == "model_id"
            assert str(root.parent) not in err.reason and "/tmp" not in err.reason.replace(
                model_id, ""
            )
            code_after, _ = await rpc_error(server.stub.Describe(pb.DescribeRequest()))
            assert code_after == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_allowlisted_ids_reach_the_adapter_without_a_path(root: Path) -> None:
    seen: list[ModelRef] = []

    class Recording:
        def load(self, ref: ModelRef, options: Any, progress: Any) -> ServedModel:
            seen.append(ref)
            return ServedModel(Gaussian())

    async def body() -> None:
        config = ServerConfig(admin_token=ADMIN, allowlist=("org/model-v1",))
        async with running(config, adapter=Recording()) as server:
            await _load(server.stub, "org/model-v1")
            code, _ = await rpc_error(_load(server.stub, "org/other"))
            assert code == grpc.StatusCode.NOT_FOUND

    run(body())
    assert seen == [ModelRef("org/model-v1", None)]


def test_hot_swap_under_eight_concurrent_callers(root: Path) -> None:
    async def body() -> None:
        async with running(_config(root, workers=4), adapter=ExpertFileAdapter()) as server:
            first = (await _load(server.stub, "a.yaml"))[-1].revision
            swapped_at: list[float] = []
            replies: list[tuple[float, str, torch.Tensor]] = []
            failures: list[BaseException] = []

            async def caller() -> None:
                while not swapped_at or time.monotonic() < swapped_at[0] + 0.3:
                    started = time.monotonic()
                    try:
                        v, revision = await _velocity(server.stub)
                    except grpc.aio.AioRpcError as e:  # pragma: no cover (must not happen)
                        failures.append(e)
                        continue
                    replies.append((started, revision, v))

            async def swapper() -> str:
                await asyncio.sleep(0.3)
                events = await _load(server.stub, "b.yaml")
                swapped_at.append(time.monotonic())
                return events[-1].revision

            *_, second = await asyncio.gather(*(caller() for _ in range(8)), swapper())
            assert not failures
            assert first != second
            by_revision: dict[str, list[torch.Tensor]] = {first: [], second: []}
            for started, revision, v in replies:
                by_revision[revision].append(v)
                if started > swapped_at[0]:
                    assert revision == second, "a call started after the swap got the old model"
            assert by_revision[first] and by_revision[second]
            # each revision answers with its own model: the means differ by 4 along x
            old, new = by_revision[first][0], by_revision[second][0]
            assert all(torch.equal(v, old) for v in by_revision[first])
            assert all(torch.equal(v, new) for v in by_revision[second])
            assert not torch.allclose(old, new)

    run(body())


def test_in_flight_calls_finish_on_the_old_model(root: Path) -> None:
    _write(root / "slow.yaml", {"mean": [0.0, 0.0], "delay_s": 1.0})
    _write(root / "fast.yaml", {"mean": [3.0, 3.0]})

    async def body() -> None:
        async with running(_config(root), adapter=GaussianFileAdapter()) as server:
            old = (await _load(server.stub, "slow.yaml"))[-1].revision
            in_flight = asyncio.create_task(_velocity(server.stub))
            await asyncio.sleep(0.2)
            new = (await _load(server.stub, "fast.yaml"))[-1].revision
            assert not in_flight.done()
            v_new, revision = await _velocity(server.stub)
            assert revision == new
            v_old, revision = await in_flight
            assert revision == old
            torch.testing.assert_close(v_old, Gaussian([0.0, 0.0]).velocity(X, SIGMA))
            torch.testing.assert_close(v_new, Gaussian([3.0, 3.0]).velocity(X, SIGMA))

    run(body())


def test_failed_load_keeps_the_old_model_serving(root: Path) -> None:
    _write(root / "g.yaml", {"mean": [0.0, 0.0]})
    _write(root / "broken.yaml", {"mean": [1.0, 1.0], "fail": True})

    async def body() -> None:
        async with running(_config(root), adapter=ExpertFileAdapter()) as server:
            revision = (await _load(server.stub, "a.yaml"))[-1].revision
            code, err = await rpc_error(_load(server.stub, "bad.yaml"))
            assert (
                code == grpc.StatusCode.INVALID_ARGUMENT
                and err is not None
                and err.field == "model_id"
            )
            assert (await server.stub.Describe(pb.DescribeRequest())).revision == revision
            _, served_by = await _velocity(server.stub)
            assert served_by == revision
            assert await _health(server.channel) == health_pb2.HealthCheckResponse.SERVING

        async with running(_config(root), adapter=GaussianFileAdapter()) as server:
            revision = (await _load(server.stub, "g.yaml"))[-1].revision
            stream = server.stub.LoadModel(
                pb.LoadModelRequest(model_id="broken.yaml"), metadata=ADMIN_MD
            )
            seen: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for event in stream:
                    seen.append(event.stage)
            assert seen and seen[0] == pb.LOAD_STAGE_LOADING and pb.LOAD_STAGE_READY not in seen
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert str(root) not in (failed.value.details() or "")
            _, served_by = await _velocity(server.stub)
            assert served_by == revision

    run(body())


def test_concurrent_loads_of_one_id_load_it_once(root: Path) -> None:
    _write(root / "g.yaml", {"mean": [1.0, 0.0]})
    adapter = GaussianFileAdapter(load_delay_s=0.3)

    async def body() -> None:
        async with running(_config(root), adapter=adapter) as server:
            first, second = await asyncio.gather(
                _load(server.stub, "g.yaml"), _load(server.stub, "g.yaml")
            )
            assert first[-1].stage == second[-1].stage == pb.LOAD_STAGE_READY
            assert first[-1].revision == second[-1].revision
            queued = [pb.LOAD_STAGE_QUEUED in [e.stage for e in s] for s in (first, second)]
            assert sorted(queued) == [False, True]  # one started the load, the other joined it
            starter = first if not queued[0] else second
            progress = [e.progress for e in starter if e.stage == pb.LOAD_STAGE_LOADING]
            assert progress == [0.0, 0.25, 0.75]

    run(body())
    assert adapter.loads == 1


def test_handles_of_a_swapped_out_model_are_failed_precondition(root: Path) -> None:
    async def body() -> None:
        async with running(_config(root), adapter=ExpertFileAdapter()) as server:
            await _load(server.stub, "a.yaml")
            handle = (await server.stub.Prepare(pb.PrepareRequest())).handle
            request = pb.VelocityRequest(
                x=codec.encode(X), sigma=codec.encode(SIGMA), handle=handle
            )
            await server.stub.Velocity(request)
            await _load(server.stub, "b.yaml")
            code, err = await rpc_error(server.stub.Velocity(request))
            assert (
                code == grpc.StatusCode.FAILED_PRECONDITION
                and err is not None
                and err.field == "handle"
            )
            assert (await server.stub.Release(pb.ReleaseRequest(handle=handle))).released

    run(body())


def test_load_unload_cycles_do_not_grow_memory(root: Path) -> None:
    _write(root / "g1.yaml", {"mean": [1.0, 0.0]})
    _write(root / "g2.yaml", {"mean": [-1.0, 0.0]})
    adapter = GaussianFileAdapter()

    async def cycle(server: Any, i: int) -> None:
        await _load(server.stub, f"g{1 + i % 2}.yaml")
        handle = (await server.stub.Prepare(pb.PrepareRequest())).handle
        await server.stub.Velocity(
            pb.VelocityRequest(x=tensor(X), sigma=tensor(SIGMA), handle=handle)
        )

    async def body() -> tuple[int, int]:
        async with running(_config(root), adapter=adapter) as server:
            for i in range(5):  # warm up caches (protobuf, metrics label sets, executors)
                await cycle(server, i)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for i in range(30):
                await cycle(server, i)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
            alive = sum(ref() is not None for ref in adapter.refs)
            return growth, alive

    growth, alive = run(body(), timeout=scaled(60))
    assert alive <= 1, f"{alive} experts still alive after 35 loads"
    assert growth < 200_000, f"memory grew by {growth} bytes over 30 load cycles"


def test_stopping_during_a_load_cancels_it_cleanly(root: Path) -> None:
    _write(root / "g.yaml", {"mean": [1.0, 0.0]})

    async def body() -> None:
        async with running(_config(root), adapter=GaussianFileAdapter(load_delay_s=0.5)) as server:
            stream = server.stub.LoadModel(
                pb.LoadModelRequest(model_id="g.yaml"), metadata=ADMIN_MD
            )
            assert (await stream.read()).stage == pb.LOAD_STAGE_LOADING
            await server.host.stop(0)
            assert not server.host.models._jobs

    run(body())


class Overlaps(Gaussian):
    """A Gaussian that counts how many of its calls run at once (each holds for a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(scaled(0.05))
        with self._lock:
            self.running -= 1
        return super().velocity(x, sigma)


@pytest.mark.parametrize("concurrent", [True, False])
def test_a_model_that_is_not_concurrent_answers_one_call_at_a_time(concurrent: bool) -> None:
    """``ServedModel(concurrent=False)`` (the library adapters: a diffusers pipeline called
    from several threads on fresh conditions did not always give the same velocity): eight
    concurrent Velocity calls never overlap in the expert; with ``True`` they do, and every
    reply is the same as alone."""
    expert = Overlaps()
    served = ServedModel(expert, concurrent=concurrent)

    async def body() -> None:
        async with running(ServerConfig(workers=8), expert=served) as server:
            request = pb.VelocityRequest(x=codec.encode(X), sigma=codec.encode(SIGMA))
            replies = await asyncio.gather(*(server.stub.Velocity(request) for _ in range(8)))
            want = Gaussian().velocity(X, SIGMA)
            for reply in replies:
                assert torch.equal(codec.decode(reply.velocity, field="v"), want)

    run(body())
    assert (expert.most > 1) if concurrent else (expert.most == 1)


def test_the_library_adapters_serve_one_call_at_a_time(flow_models, root: Path) -> None:
    """The flow adapters' pipelines are not concurrent; the analytic experts' files are."""
    from poegen.expert_servers.flow import FlowAdapter, FluxAdapter

    for adapter, name, options in (
        (FluxAdapter(), "flux", {"max_sequence_length": "16"}),
        (FlowAdapter(), "unet", {}),
    ):
        ref = ModelRef(name, flow_models.path(name))
        assert adapter.load(ref, options, lambda f, m: None).concurrent is False
    analytic = ExpertFileAdapter().load(ModelRef("a.yaml", root / "a.yaml"), {}, lambda f, m: None)
    assert analytic.concurrent is True
