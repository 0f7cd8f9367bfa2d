"""Physics and graphics experts over real gRPC: loaded through their adapters (LoadModel),
Prepare + Render + Propose + LogProb on a real host, and the bad-input table (each refused
with its code and field while the server keeps serving)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import trimesh
from helpers.server import collect, rpc_error, run, running
from helpers.timing import scaled

from poegen.expert_servers.graphics import GraphicsAdapter
from poegen.expert_servers.physics import PhysicsAdapter
from poegen.expert_servers.server import ServerConfig
from poegen.kernel import codec
from poegen.v1 import expert_pb2 as pb

ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)

BALL = """
objects:
  - {name: ball, shape: sphere, size: [0.3], position: [0, 0, 1]}
camera: {position: [0, -4, 1], look_at: [0, 0, 1], fov: 45}
width: 32
height: 32
frames: 3
fps: 10
"""
CUBE = """
mesh: meshes/cube.obj
position: [0, 0, 0]
camera: {position: [2, -3, 2], look_at: [0, 0, 0], fov: 45}
width: 32
height: 24
"""


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    assets = root / "assets"
    (assets / "scenes").mkdir(parents=True)
    (assets / "meshes").mkdir()
    (assets / "scenes" / "ball.yaml").write_text(BALL)
    trimesh.creation.box(extents=(1, 1, 1)).export(assets / "meshes" / "cube.obj")
    (root / "outside.obj").write_text((assets / "meshes" / "cube.obj").read_text())
    return root


def _condition(text: str, **scalars: float) -> pb.Condition:
    return pb.Condition(text=text, scalars=scalars)


async def _load(stub, model_id: str, **options: str) -> None:
    replies = await collect(
        stub.LoadModel(pb.LoadModelRequest(model_id=model_id, options=options), metadata=ADMIN_MD)
    )
    assert replies[-1].revision


def _config(root: Path) -> ServerConfig:
    return ServerConfig(model_root=root, admin_token=ADMIN)


def test_physics_over_grpc_prepare_render_propose(model_root: Path) -> None:
    async def body() -> None:
        async with running(_config(model_root), adapter=PhysicsAdapter()) as server:
            await _load(server.stub, "assets", weight="2.0")
            described = await server.stub.Describe(pb.DescribeRequest())
            assert pb.CAPABILITY_RENDER in described.capabilities
            handle = (
                await server.stub.Prepare(
                    pb.PrepareRequest(condition=_condition("scenes/ball.yaml"))
                )
            ).handle
            reply = await server.stub.Render(
                pb.RenderRequest(handle=handle, names=["mask", "target"])
            )
            assert set(reply.tensors) == {"mask", "target"}
            mask = codec.decode(reply.tensors["mask"], field="mask")
            target = codec.decode(reply.tensors["target"], field="target")
            assert mask.shape == (3, 1, 32, 32) and mask.sum() > 20
            assert target.shape == (3, 3, 32, 32)
            # propose at tiny σ puts the rendering's pixels in the mask
            x = torch.zeros(2, *target.shape)
            moved = await server.stub.Propose(pb.ProposeRequest(
                x=codec.encode(x), sigma=codec.encode(torch.full((2,), 1e-6)),
                mode=pb.PROPOSE_MODE_PROPOSE, seed=5, handle=handle))  # fmt: skip
            moved_x = codec.decode(moved.x, field="x")
            inside = mask[:, 0].bool().unsqueeze(0).expand(3, -1, -1, -1)
            torch.testing.assert_close(moved_x[0][inside], target[inside], atol=1e-5, rtol=0)
            # the Gaussian tie: −(w/2)‖m⊙(x0 − x_ref)‖² with w from the load option
            lp = await server.stub.LogProb(pb.LogProbRequest(x=codec.encode(x), handle=handle))
            want = -1.0 * float((target[inside] ** 2).sum())
            assert codec.decode(lp.log_prob, field="lp")[0].item() == pytest.approx(want, rel=1e-5)

    run(body(), timeout=scaled(120))


def test_physics_tie_as_a_score_over_grpc(model_root: Path) -> None:
    """``tie=score``: the scene announces SCORE and LOG_PROB and answers the noised tie's exact
    score and log-density at a level (what the sampler adds to its MCMC moves)."""

    async def body() -> None:
        async with running(_config(model_root), adapter=PhysicsAdapter()) as server:
            await _load(server.stub, "assets", weight="2.0", tie="score")
            described = await server.stub.Describe(pb.DescribeRequest())
            assert pb.CAPABILITY_SCORE in described.capabilities
            assert pb.CAPABILITY_LOG_PROB in described.capabilities
            handle = (
                await server.stub.Prepare(
                    pb.PrepareRequest(condition=_condition("scenes/ball.yaml"))
                )
            ).handle
            reply = await server.stub.Render(
                pb.RenderRequest(handle=handle, names=["target", "target_mask"])
            )
            target = codec.decode(reply.tensors["target"], field="target")
            mask = codec.decode(reply.tensors["target_mask"], field="target_mask")
            x = torch.zeros(2, *target.shape)
            sigma = torch.full((2,), 0.5)
            request = {"x": codec.encode(x), "sigma": codec.encode(sigma), "handle": handle}
            reply_score = await server.stub.Score(pb.ScoreRequest(**request))
            score = codec.decode(reply_score.score, field="score")
            # −m⊙(x − (1 − σ)·x_ref) / ((1 − σ)²/w + σ²), w = 2
            want = mask * 0.5 * target / (0.25 / 2 + 0.25)
            torch.testing.assert_close(score, want.expand_as(score), atol=1e-5, rtol=1e-5)
            lp = await server.stub.LogProb(pb.LogProbRequest(**request))
            assert codec.decode(lp.log_prob, field="lp").shape == (2,)
            # the base expert still refuses without a scene
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await server.stub.Score(pb.ScoreRequest(x=request["x"], sigma=request["sigma"]))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    run(body(), timeout=scaled(120))


def test_graphics_over_grpc(model_root: Path) -> None:
    async def body() -> None:
        async with running(_config(model_root), adapter=GraphicsAdapter()) as server:
            await _load(server.stub, "assets")
            handle = (
                await server.stub.Prepare(pb.PrepareRequest(condition=_condition(CUBE)))
            ).handle
            reply = await server.stub.Render(pb.RenderRequest(handle=handle))
            mask = codec.decode(reply.tensors["mask"], field="mask")
            assert mask.shape == (1, 1, 24, 32) and 20 < mask.sum() < 24 * 32

    run(body(), timeout=scaled(120))


MJCF_BROKEN = "<mujoco><worldbody><body><geom type='sphere' size='0.1'></body></worldbody>"
TABLE = [
    # (backend, condition, code, field, words in the message)
    ("physics", _condition("objects: [{shape: pyramid, size: [1]}]"),
     grpc.StatusCode.INVALID_ARGUMENT, "objects[0].shape", "sphere"),
    ("physics", _condition("objects: [{shape: sphere, size: [0.1], mass: -2}]"),
     grpc.StatusCode.INVALID_ARGUMENT, "objects[0].mass", "greater than 0"),
    ("physics", _condition("camera: {position: [0, -4, 1], look_at: [0, -4, 1]}"),
     grpc.StatusCode.INVALID_ARGUMENT, "camera.look_at", "looks nowhere"),
    ("physics", _condition("scenes/ball.yaml", frames=100000),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "frames", "at most"),
    ("physics", _condition("objects: [{shape: mesh, size: [1], mesh: ../outside.obj}]"),
     grpc.StatusCode.INVALID_ARGUMENT, "objects[0].mesh", "without '..'"),
    ("graphics", _condition(CUBE.replace("meshes/cube.obj", "../outside.obj")),
     grpc.StatusCode.INVALID_ARGUMENT, "objects[0].mesh", "without '..'"),
    ("graphics", _condition(CUBE.replace("meshes/cube.obj", "file:///etc/hosts.obj")),
     grpc.StatusCode.INVALID_ARGUMENT, "objects[0].mesh", "under the asset root"),
    ("physics", _condition(MJCF_BROKEN),
     grpc.StatusCode.INVALID_ARGUMENT, "condition.text", "MuJoCo: XML parse error"),
    ("physics", _condition("<mujoco><worldbody><geom type='bogus'/></worldbody></mujoco>"),
     grpc.StatusCode.INVALID_ARGUMENT, "condition.text", "MuJoCo:"),
    ("physics", _condition("<mujoco><asset><mesh file='/etc/passwd.stl'/></asset></mujoco>"),
     grpc.StatusCode.INVALID_ARGUMENT, "mesh.file", "relative"),
    ("physics", _condition("scenes/../../outside.yaml"),
     grpc.StatusCode.INVALID_ARGUMENT, "condition.text", "without '..'"),
    ("physics", _condition("scenes/ball.yaml", colour=1.0),
     grpc.StatusCode.INVALID_ARGUMENT, "condition.scalars[colour]", "not understood"),
    ("physics", _condition("scenes/ball.yaml", width=4096),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "width", "at most"),
    ("physics", _condition("objects: [" + ", ".join(["{shape: sphere, size: [0.1]}"] * 65) + "]"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "objects", "at most 64"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["physics", "graphics"])
def test_bad_input_table_over_grpc(model_root: Path, backend: str) -> None:
    adapter = PhysicsAdapter() if backend == "physics" else GraphicsAdapter()
    good = _condition("scenes/ball.yaml", frames=1) if backend == "physics" else _condition(CUBE)

    async def body() -> None:
        async with running(_config(model_root), adapter=adapter) as server:
            await _load(server.stub, "assets")
            for name, condition, code, field, words in TABLE:
                if name != backend:
                    continue
                got, err = await rpc_error(
                    server.stub.Prepare(pb.PrepareRequest(condition=condition))
                )
                assert (got, err and err.field) == (code, field), (condition.text[:60], err)
                assert words in err.reason, err
                assert str(model_root) not in err.reason
                # the server keeps serving
                handle = (await server.stub.Prepare(pb.PrepareRequest(condition=good))).handle
                assert (
                    await server.stub.Render(pb.RenderRequest(handle=handle, names=["mask"]))
                ).tensors

    run(body(), timeout=scaled(240))


def test_bad_load_options_and_ids(model_root: Path) -> None:
    async def body() -> None:
        async with running(_config(model_root), adapter=PhysicsAdapter()) as server:
            for model_id, options, field in [
                ("assets", {"moves": "jump"}, "options[moves]"),
                ("assets", {"colour": "red"}, "options[colour]"),
                ("assets", {"autoencoder": "flux:../elsewhere"}, "options[autoencoder]"),
                ("assets", {"autoencoder": "nosuchbackend:meshes"}, "options[autoencoder]"),
                ("outside.obj", {}, "model_id"),
            ]:
                stream = server.stub.LoadModel(
                    pb.LoadModelRequest(model_id=model_id, options=options), metadata=ADMIN_MD
                )
                code, err = await rpc_error(collect(stream))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == field, err
            # an unprepared call needs a scene
            await _load(server.stub, "assets")
            code, err = await rpc_error(server.stub.Render(pb.RenderRequest()))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and err.field == "handle"

    run(body(), timeout=scaled(120))


def test_backends_are_registered() -> None:
    from poegen.expert_servers.server.backends import backend_class, create_adapter

    assert backend_class("physics") is PhysicsAdapter
    assert backend_class("graphics") is GraphicsAdapter
    assert isinstance(create_adapter("physics"), PhysicsAdapter)
