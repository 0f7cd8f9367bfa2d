"""The Ray Serve app (``deploy/ray``) on a real local Ray cluster, started once for the module.

The cluster runs with Ray 2.60's token auth on (a fresh token in ``RAY_AUTH_TOKEN``, so nothing
is written under ``~/.ray``); Serve's gRPC proxy listens on a free port with the servicer
functions of ``deploy/ray/config.yaml``, and that file is deployed with the command its README
gives (``serve run --non-blocking deploy/ray/config.yaml``, from the repository root, where its
relative model folders resolve). Each expert is compared with ``poegen serve`` of the same
model (the same planning and LoadModel path, on 127.0.0.1 port 0, in this process):
Describe, Velocity and LogProb bits, and a kernel ``sample`` job bit for bit.

Clients pick an application (and a multiplexed variant) with call metadata. RemoteExpert has no
option for extra metadata yet, so :func:`connect` builds one over a channel that adds it (the
constructor takes the channel factory); with a single application on the proxy the plain
``RemoteExpert.connect(proxy)`` works unchanged (:func:`test_single_app_plain_client_job`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from helpers.remote import LoopThread, free_port, wait_until
from helpers.timing import scaled

from poegen import Client, GenerationSpec
from poegen.expert_servers.server.cli import ServeRequest, plan
from poegen.kernel import codec
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.experts import ExpertInfo
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RetryPolicy
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.kernel.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from poegen.v1 import expert_pb2 as pb
from poegen.v1 import expert_pb2_grpc

ray = pytest.importorskip("ray", reason="the ray extra (pip install -e '.[ray]')")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402
from ray.serve.generated import serve_pb2, serve_pb2_grpc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path("deploy/ray/config.yaml")  # relative: the command of the README
APPS = ("ring", "digits")
SERVE = str(Path(sys.executable).with_name("serve"))
# The module's cluster (a Ray head, Serve's controller and proxy, two apps' replicas) starts
# within its first test's limit. On the 2-core machine kept busy by two CPU hogs, the digits
# app's replica took 185 s to be scheduled and initialised (93 s in its constructor: imports
# and the model), past the 240 s this module allowed for the whole start.
pytestmark = pytest.mark.timeout(scaled(900))


@dataclass
class Cluster:
    """The running cluster: the proxy's address and the environment of ``serve`` commands."""

    proxy: str
    env: dict[str, str]
    config: dict[str, Any]

    def serve_run(self, config: Path) -> None:
        """``serve run --non-blocking CONFIG`` against this cluster (RAY_ADDRESS)."""
        done = subprocess.run(
            [SERVE, "run", "--non-blocking", str(config)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert done.returncode == 0, done.stderr[-2000:]

    def redeploy(self, tmp_path: Path, app: str, **deployment: Any) -> None:
        """Deploy the config again with ``deployment`` fields of ``app``'s Expert replaced."""
        data = yaml.safe_load((REPO / CONFIG).read_text())
        for entry in data["applications"]:
            if entry["name"] == app:
                entry["deployments"][0].update(deployment)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        self.serve_run(path)
        wait_running(app)


def logged(text: str) -> bool:
    """Whether a log file of this cluster's processes (replicas included) contains ``text``."""
    # the session's log folder: private API, but the only handle without the dashboard
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return any(
        text in path.read_text(errors="replace") for path in logs.rglob("*") if path.is_file()
    )


def wait_running(*apps: str, timeout: float = scaled(600)) -> None:
    """Until every app is RUNNING (its replicas loaded their model)."""
    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications
        states = {a: status[a].status if a in status else "MISSING" for a in apps}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {a: status[a].message for a, s in states.items() if s == "DEPLOY_FAILED"}
        assert not failed, failed
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    config = yaml.safe_load((REPO / CONFIG).read_text())
    with pytest.MonkeyPatch.context() as patch:
        # Ray's default for a new local cluster: ray.init turns token auth on (RAY_AUTH_MODE
        # unset); the token is ours, so none is generated under ~/.ray
        patch.delenv("RAY_AUTH_MODE", raising=False)
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        patch.setenv("HF_HUB_OFFLINE", "1")
        # Serve kills a proxy not ready within 5 s (health checks 10 s): too short for a busy
        # 2-core machine, where the proxy's imports alone take longer
        for name in ("READY_CHECK", "HEALTH_CHECK"):
            patch.setenv(f"RAY_SERVE_PROXY_{name}_TIMEOUT_S", str(scaled(60)))
        patch.chdir(REPO)  # the replicas start here: the config's relative model folders
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            options = config["grpc_options"]
            serve.start(
                http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options=gRPCOptions(
                    port=port, grpc_servicer_functions=options["grpc_servicer_functions"]
                ),
            )
            assert os.environ.get("RAY_AUTH_MODE") == "token"  # set by ray.init
            env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
            running = Cluster(f"127.0.0.1:{port}", env, config)
            running.serve_run(CONFIG)
            wait_running(*APPS)
            yield running
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def local() -> Iterator[dict[str, str]]:
    """``poegen serve BACKEND --model M --port 0`` of the models the config serves (and of the
    variant used here): the CLI's planning and its LoadModel path, on a loop in this process."""
    models = {
        "ring": ("analytic", "examples/experts/ring.yaml"),
        "bar": ("analytic", "examples/experts/bar.yaml"),
        "digits": ("flow", "expert_servers/digits/weights/flow-all"),
    }
    # the replicas compute with one torch thread (the config's torch_threads); so do these
    # hosts, whose worker threads take the thread count of the moment they are made: BLAS
    # reductions may group sums differently with another count (1 ulp apart, measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    thread = LoopThread()
    try:
        addresses = {}
        for name, (backend, model) in models.items():
            served = plan(ServeRequest(backend, model=str(REPO / model), port=0))
            running = thread.serve(None, served.config, adapter=served.adapter)
            assert served.model_id is not None

            async def load(host: Any = running.host, model_id: str = served.model_id) -> None:
                async for _ in host.models.load(model_id, {}):
                    pass

            thread.run(load(), timeout=scaled(120))
            addresses[name] = running.address
        addresses["sampler"] = thread.sampler().address  # the Sampler service, for jobs
        torch.set_num_threads(threads)
        yield addresses
    finally:
        torch.set_num_threads(threads)
        thread.close()


# --------------------------------------------------------------------------- clients


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (``application``, ``multiplexed_model_id``) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: Any) -> _Details:
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def metadata(app: str, variant: str | None = None) -> list[tuple[str, str]]:
    pairs = [("application", app)]
    return [*pairs, ("multiplexed_model_id", variant)] if variant else pairs


def channel(address: str, app: str, variant: str | None = None) -> grpc.Channel:
    plain = grpc.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    return grpc.intercept_channel(plain, _AddMetadata(metadata(app, variant)))


def connect(
    address: str, app: str, variant: str | None = None, condition: pb.Condition | None = None
) -> RemoteExpert:
    """``RemoteExpert.connect(address)`` whose calls carry the app's (and variant's) metadata."""
    expert = RemoteExpert(
        lambda: channel(address, app, variant),
        address,
        condition=condition,
        token=None,
        deadline_s=scaled(60),
        retry=RetryPolicy(),
        jitter_seed=0,
        shared_memory=False,
    )
    try:
        expert._start()  # what connect() does after building the expert
    except BaseException:
        expert.close()
        raise
    return expert


def stub(address: str, app: str, variant: str | None = None) -> expert_pb2_grpc.ExpertServiceStub:
    return expert_pb2_grpc.ExpertServiceStub(channel(address, app, variant))


def points(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-0.8, 0.8, 2 * n, dtype=torch.float32).reshape(n, 2)
    return x, torch.linspace(0.2, 0.9, n, dtype=torch.float32)


def same_description(a: RemoteExpert, b: RemoteExpert) -> None:
    ours, theirs = a._describe, b._describe  # the DescribeResponse each connect received
    assert ours is not None and theirs is not None
    ours, theirs = pb.DescribeResponse.FromString(ours.SerializeToString()), theirs
    ours.revision = theirs.revision = ""  # each host numbers its own loads
    assert ours == theirs
    assert without_revision(a.describe()) == without_revision(b.describe())


def without_revision(info: ExpertInfo) -> ExpertInfo:
    return dataclasses.replace(info, revision="")


# --------------------------------------------------------------------------- tests (no cluster)


def test_every_expert_rpc_has_a_replica_method() -> None:
    from poegen.ray_serve.app import ExpertReplica

    service = pb.DESCRIPTOR.services_by_name["ExpertService"]
    assert all(callable(getattr(ExpertReplica, m.name, None)) for m in service.methods)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"server": {}}, "args.backend"),
        ({"backend": "analytic", "server": {"port": 9000}}, "server.port"),
        ({"backend": "analytic", "server": {"workers": 0}}, "server.workers"),
        ({"backend": "analytic", "torch_threads": 0}, "args.torch_threads"),
        ({"backend": "analytic", "replicas": 2}, "args.replicas"),
    ],
)
def test_build_app_names_the_bad_field(args: dict[str, Any], field: str) -> None:
    from poegen.expert_servers.server.config import ConfigError
    from poegen.ray_serve.app import build_app

    with pytest.raises(ConfigError, match=rf"^{field}:"):
        build_app(args)


def test_reconfigure_validates_user_config() -> None:
    """The replica class outside Serve: a bad user_config names its field; a good one loads."""
    import asyncio

    from poegen.expert_servers.server.config import ConfigError
    from poegen.kernel.errors import ExpertError
    from poegen.ray_serve.app import ExpertReplica

    replica = ExpertReplica("analytic", {"model_root": str(REPO / "examples/experts")})
    with pytest.raises(ConfigError, match=r"^user_config.model:"):
        asyncio.run(replica.reconfigure({"model": ""}))
    with pytest.raises(ConfigError, match=r"^user_config.revision:"):
        asyncio.run(replica.reconfigure({"model": "ring.yaml", "revision": "x"}))
    with pytest.raises(ExpertError) as err:
        asyncio.run(replica.reconfigure({"model": "missing.yaml"}))
    assert (err.value.code, err.value.field) == (Code.NOT_FOUND, "model_id")
    asyncio.run(replica.reconfigure({"model": "ring.yaml"}))
    served = replica._base.models.require()
    assert served.info.name == "ring"
    # once a model serves, a failed swap keeps it (logged): Serve would kill a raising replica
    asyncio.run(replica.reconfigure({"model": "missing.yaml"}))
    asyncio.run(replica.reconfigure({"model": ""}))
    assert replica._base.models.require() is served


# --------------------------------------------------------------------------- tests (cluster)


def test_config_lists_the_apps_servicer_functions(cluster: Cluster) -> None:
    from poegen.ray_serve.app import GRPC_SERVICER_FUNCTIONS

    assert tuple(cluster.config["grpc_options"]["grpc_servicer_functions"]) == (
        GRPC_SERVICER_FUNCTIONS
    )
    assert [a["name"] for a in cluster.config["applications"]] == list(APPS)


def test_analytic_expert_same_describe_and_bits(cluster: Cluster, local: dict[str, str]) -> None:
    x, sigma = points()
    empty = pb.Condition()  # prepared: every call then carries the replica's handle
    with (
        connect(cluster.proxy, "ring", condition=empty) as served,
        RemoteExpert.connect(local["ring"], condition=empty) as plain,
    ):
        assert served.handle and plain.handle
        same_description(served, plain)
        assert served.describe().name == "ring"
        assert torch.equal(served.velocity(x, sigma), plain.velocity(x, sigma))
        assert torch.equal(served.log_prob(x, sigma), plain.log_prob(x, sigma))
        assert torch.equal(served.score(x, sigma), plain.score(x, sigma))
        x64, s64 = x.double(), sigma.double()
        assert torch.equal(served.velocity(x64, s64), plain.velocity(x64, s64))


def test_digits_flow_expert_same_describe_and_bits(cluster: Cluster, local: dict[str, str]) -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.6, 0.3, 0.1])
    with connect(cluster.proxy, "digits") as served, RemoteExpert.connect(local["digits"]) as plain:
        same_description(served, plain)
        assert served.describe().name == "flow"
        assert torch.equal(served.velocity(x, sigma), plain.velocity(x, sigma))
        assert served.schedule(4, (1, 8, 8)) == plain.schedule(4, (1, 8, 8))


def test_sample_job_through_proxy_equals_local(cluster: Cluster, local: dict[str, str]) -> None:
    """ring × bar (the bar as a multiplexed variant of the ring app): the same job, same bits."""
    settings = SamplerSettings(num_particles=16, num_steps=6, mcmc_steps=1)

    def job(ring: RemoteExpert, bar: RemoteExpert) -> Any:
        factors = [Factor(ring), Factor(bar)]
        return sample(factors, (2,), settings, generator=torch.Generator().manual_seed(7))

    with connect(cluster.proxy, "ring") as ring, connect(cluster.proxy, "ring", "bar.yaml") as bar:
        served = job(ring, bar)
    with RemoteExpert.connect(local["ring"]) as ring, RemoteExpert.connect(local["bar"]) as bar:
        plain = job(ring, bar)
    assert torch.equal(served.particles, plain.particles)
    assert torch.equal(served.log_weights, plain.log_weights)
    assert served.best_index == plain.best_index


def test_digits_sample_job_through_proxy_equals_local(
    cluster: Cluster, local: dict[str, str]
) -> None:
    settings = SamplerSettings(num_particles=4, num_steps=4, mcmc_steps=0)

    def job(flow: RemoteExpert) -> Any:
        return sample(
            [Factor(flow)], (1, 8, 8), settings, generator=torch.Generator().manual_seed(3)
        )

    with connect(cluster.proxy, "digits") as flow:
        served = job(flow)
    with RemoteExpert.connect(local["digits"]) as flow:
        plain = job(flow)
    assert torch.equal(served.particles, plain.particles)


def test_multiplexed_variants_answer_per_variant(cluster: Cluster, local: dict[str, str]) -> None:
    x, sigma = points()
    with (
        connect(cluster.proxy, "ring") as ring,
        connect(cluster.proxy, "ring", "bar.yaml") as bar,
        RemoteExpert.connect(local["bar"]) as plain_bar,
    ):
        assert (ring.describe().name, bar.describe().name) == ("ring", "bar")
        assert bar._describe is not None and bar._describe.model_id == "bar.yaml"
        v_bar = bar.velocity(x, sigma)
        assert not torch.equal(ring.velocity(x, sigma), v_bar)
        assert torch.equal(v_bar, plain_bar.velocity(x, sigma))
        assert ring.revisions_seen != bar.revisions_seen  # two loads on the replica


def test_bad_requests_keep_code_and_field(cluster: Cluster) -> None:
    ring = stub(cluster.proxy, "ring")
    bad_shape = pb.VelocityRequest(
        x=codec.encode(torch.zeros(3, 5)), sigma=codec.encode(torch.full((3,), 0.5))
    )
    cases = [
        (bad_shape, grpc.StatusCode.INVALID_ARGUMENT, "x.shape"),
        (
            pb.VelocityRequest(
                x=codec.encode(torch.zeros(3, 2)), sigma=codec.encode(torch.full((3,), 2.0))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sigma",
        ),
        (
            pb.VelocityRequest(
                x=codec.encode(torch.zeros(3, 2)),
                sigma=codec.encode(torch.full((3,), 0.5)),
                handle="no-such-handle",
            ),
            grpc.StatusCode.NOT_FOUND,
            "handle",
        ),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            ring.Velocity(request, timeout=scaled(30))
        assert err.value.code() == code
        assert err.value.details().startswith(f"{field}:")
        carried = from_rpc_error(err.value)  # the BadRequest trailer crossed the proxy
        assert carried is not None and carried.field == field
    # an unknown variant: NOT_FOUND naming model_id, before any model call
    with pytest.raises(grpc.RpcError) as err:
        stub(cluster.proxy, "ring", "no-such.yaml").Describe(pb.DescribeRequest())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(err.value).field == "model_id"


def test_load_model_stream_refused_without_admin_token(cluster: Cluster) -> None:
    """LoadModel (server streaming) crosses the proxy; without an admin token it is off."""
    stream = stub(cluster.proxy, "ring").LoadModel(
        pb.LoadModelRequest(model_id="bar.yaml"), timeout=scaled(30)
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "x-poegen-admin-token" in err.value.details()


def test_health_through_the_proxy(cluster: Cluster) -> None:
    plain = grpc.insecure_channel(cluster.proxy)
    healthz = serve_pb2_grpc.RayServeAPIServiceStub(plain).Healthz(serve_pb2.HealthzRequest())
    assert healthz.message == "success"
    apps = serve_pb2_grpc.RayServeAPIServiceStub(plain).ListApplications(
        serve_pb2.ListApplicationsRequest()
    )
    assert set(APPS) <= set(apps.application_names)
    for app in APPS:
        health = health_pb2_grpc.HealthStub(channel(cluster.proxy, app))
        reply = health.Check(health_pb2.HealthCheckRequest(service="poegen.v1.ExpertService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reconfigure_hot_swaps_the_model(cluster: Cluster, tmp_path: Path) -> None:
    ring = stub(cluster.proxy, "ring")
    before = ring.Describe(pb.DescribeRequest())
    assert before.model_id == "ring.yaml"
    try:
        cluster.redeploy(tmp_path, "ring", user_config={"model": "bar.yaml"})
        after = ring.Describe(pb.DescribeRequest())
        assert (after.model_id, after.name) == ("bar.yaml", "bar")
        assert after.revision != before.revision
        x, sigma = points()
        reply = ring.Velocity(
            pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma)), timeout=scaled(30)
        )
        assert reply.revision == after.revision  # replies report the swapped-in revision
        # a model that fails to load: the served one keeps answering (the host's rule); the
        # replica's log line says the swap was refused (so the new config did reach it)
        missing = f"missing-{secrets.token_hex(4)}.yaml"
        cluster.redeploy(tmp_path, "ring", user_config={"model": missing})
        assert wait_until(lambda: logged(missing), timeout=scaled(60))
        kept = ring.Describe(pb.DescribeRequest())
        assert (kept.model_id, kept.revision) == ("bar.yaml", after.revision)
    finally:
        cluster.redeploy(tmp_path, "ring", user_config={"model": "ring.yaml"})
    assert ring.Describe(pb.DescribeRequest()).model_id == "ring.yaml"


def test_autoscaling_config_accepted_and_two_replicas_serve(
    cluster: Cluster, tmp_path: Path
) -> None:
    deployment = serve.status().applications["ring"].deployments["Expert"]
    assert deployment.status == "HEALTHY"
    autoscaling = dict(cluster.config["applications"][0]["deployments"][0]["autoscaling_config"])
    cluster.redeploy(tmp_path, "ring", autoscaling_config={**autoscaling, "min_replicas": 2})
    deadline = time.monotonic() + scaled(120)
    while (
        serve.status().applications["ring"].deployments["Expert"].replica_states.get("RUNNING", 0)
        < 2
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    ring = stub(cluster.proxy, "ring")
    # a revision is <replica instance>.<n>: two instances answering = two replicas serving
    instances = {ring.Describe(pb.DescribeRequest()).revision.split(".")[0] for _ in range(40)}
    assert len(instances) == 2


@pytest.fixture(scope="module")
def secured(cluster: Cluster) -> Iterator[dict[str, str]]:
    """A third app deployed from Python, its replica given a bearer and an admin token."""
    from poegen.ray_serve.app import ADMIN_TOKEN_ENV, TOKEN_ENV, ExpertDeployment

    tokens = {"token": secrets.token_hex(16), "admin": secrets.token_hex(16)}
    env_vars = {TOKEN_ENV: tokens["token"], ADMIN_TOKEN_ENV: tokens["admin"]}
    app = ExpertDeployment.options(
        user_config={"model": "ring.yaml"},
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env_vars}},
    ).bind("analytic", {"model_root": "examples/experts"}, 1)
    serve.run(app, name="secured", route_prefix="/secured")
    yield tokens


def test_token_guards_every_rpc_but_health(cluster: Cluster, secured: dict[str, str]) -> None:
    secured_stub = stub(cluster.proxy, "secured")
    for given in (None, "wrong"):
        call_metadata = [("authorization", f"Bearer {given}")] if given else []
        with pytest.raises(grpc.RpcError) as err:
            secured_stub.Describe(pb.DescribeRequest(), metadata=call_metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert from_rpc_error(err.value).field == "authorization"
    bearer = [("authorization", f"Bearer {secured['token']}")]
    assert secured_stub.Describe(pb.DescribeRequest(), metadata=bearer).model_id == "ring.yaml"
    health = health_pb2_grpc.HealthStub(channel(cluster.proxy, "secured"))
    assert health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_load_model_streams_through_the_proxy(cluster: Cluster, secured: dict[str, str]) -> None:
    """LoadModel's stream (QUEUED/LOADING … READY) crosses the proxy; it swaps this replica."""
    secured_stub = stub(cluster.proxy, "secured")
    call_metadata = [
        ("authorization", f"Bearer {secured['token']}"),
        ("x-poegen-admin-token", secured["admin"]),
    ]
    events = list(
        secured_stub.LoadModel(
            pb.LoadModelRequest(model_id="bar.yaml"), metadata=call_metadata, timeout=scaled(60)
        )
    )
    assert events[-1].stage == pb.LOAD_STAGE_READY
    assert any(e.stage == pb.LOAD_STAGE_LOADING for e in events)
    reply = secured_stub.Describe(pb.DescribeRequest(), metadata=call_metadata[:1])
    assert (reply.model_id, reply.revision) == ("bar.yaml", events[-1].revision)
    with pytest.raises(grpc.RpcError) as err:  # a refused load: code and message cross
        list(
            secured_stub.LoadModel(
                pb.LoadModelRequest(model_id="../escape.yaml"), metadata=call_metadata
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("model_id:")


def test_single_app_plain_client_job(cluster: Cluster, local: dict[str, str]) -> None:
    """With one application on the proxy, clients need no metadata: RemoteExpert.connect(proxy)
    and a Sampler job naming the proxy run unchanged, bit for bit as against poegen serve."""
    for app in serve.status().applications:
        if app != "ring":
            serve.delete(app)
    x, sigma = points()
    settings = SamplerSettings(num_particles=8, num_steps=4, mcmc_steps=1)
    with (
        RemoteExpert.connect(cluster.proxy) as served,
        RemoteExpert.connect(local["ring"]) as plain,
    ):
        assert without_revision(served.describe()) == without_revision(plain.describe())
        assert torch.equal(served.velocity(x, sigma), plain.velocity(x, sigma))
        runs = [
            sample([Factor(e)], (2,), settings, generator=torch.Generator().manual_seed(1))
            for e in (served, plain)
        ]
    assert torch.equal(runs[0].particles, runs[1].particles)
    # a Sampler service job whose spec names the proxy: the same result as against poegen serve
    results = []
    for address in (cluster.proxy, local["ring"]):
        spec = GenerationSpec.from_mapping(
            {
                "seed": 5,
                "settings": {"num_particles": 8, "num_steps": 4, "mcmc_steps": 1},
                "experts": [{"address": address, "name": "ring"}],
            }
        )
        with Client(local["sampler"]) as client:
            results.append(client.generate(spec, timeout=scaled(60)))
    assert torch.equal(results[0].particles, results[1].particles)
