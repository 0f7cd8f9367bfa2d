"""The physics expert on the real engine (MuJoCo, offscreen EGL): free fall seen by the camera,
metric depth from the camera geometry, disjoint masks, determinism, latent masks, the scene
schema's errors, and the constraint on the rendering."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from poegen.expert_servers.physics import PhysicsExpert
from poegen.expert_servers.physics.latents import control_depth, mask_to_sample, temporal_groups
from poegen.expert_servers.server import Condition
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability

G = 9.81
RADIUS, Z0 = 0.1, 1.2
CAM_Y, CAM_Z, FOV, SIDE = -5.0, 0.8, 40.0, 96
FPS, FRAMES = 25.0, 12

DROP = f"""
objects:
  - {{name: ball, shape: sphere, size: [{RADIUS}], mass: 0.2, position: [0, 0, {Z0}],
      colour: [0.9, 0.1, 0.1]}}
  - {{name: crate, shape: box, size: [0.15, 0.15, 0.15], position: [0.6, 0.3, 0.15],
      colour: [0.1, 0.3, 0.9]}}
camera: {{position: [0, {CAM_Y}, {CAM_Z}], look_at: [0, 0, {CAM_Z}], fov: {FOV}}}
width: {SIDE}
height: {SIDE}
frames: {FRAMES}
fps: {FPS}
"""


@pytest.fixture(scope="module")
def expert(tmp_path_factory: pytest.TempPathFactory) -> PhysicsExpert:
    root = tmp_path_factory.mktemp("assets")
    (root / "drop.yaml").write_text(DROP)
    return PhysicsExpert(root)


@pytest.fixture(scope="module")
def drop(expert: PhysicsExpert) -> dict[str, torch.Tensor]:
    return expert.prepare(Condition(text="drop.yaml")).render()


def _focal() -> float:
    return SIDE / 2 / math.tan(math.radians(FOV) / 2)


def test_mask_centroid_follows_free_fall_until_contact(drop: dict[str, torch.Tensor]) -> None:
    times = drop["times"].double()
    contact = math.sqrt(2 * (Z0 - RADIUS) / G)
    assert times[-1] < contact and times[1] == pytest.approx(1 / FPS)
    f, depth_to_ball = _focal(), -CAM_Y
    for i, t in enumerate(times.tolist()):
        ball = drop["masks"][i, 0]
        ys, xs = torch.nonzero(ball, as_tuple=True)
        centroid = (xs.double().mean() + 0.5, ys.double().mean() + 0.5)
        z = Z0 - 0.5 * G * t * t  # ½·g·t²
        expected = (SIDE / 2, SIDE / 2 - f * (z - CAM_Z) / depth_to_ball)
        assert abs(centroid[0] - expected[0]) < 1.0, (i, centroid, expected)
        assert abs(centroid[1] - expected[1]) < 1.0, (i, centroid, expected)
    # the ball moved by many pixels, so the test can fail
    assert expected[1] - (SIDE / 2 - f * (Z0 - CAM_Z) / depth_to_ball) > 10


def test_depth_at_the_ball_matches_the_camera_geometry(drop: dict[str, torch.Tensor]) -> None:
    f = _focal()
    origin = np.array([0.0, CAM_Y, CAM_Z])
    for i in (0, FRAMES // 2, FRAMES - 1):
        centre = drop["positions"][i, 0].double().numpy()
        u = SIDE / 2 + f * centre[0] / (centre[1] - CAM_Y)
        v = SIDE / 2 - f * (centre[2] - CAM_Z) / (centre[1] - CAM_Y)
        col, row = int(u), int(v)
        # the ray through that pixel's centre, in the world (camera looks along +y, z up)
        ray = np.array([(col + 0.5 - SIDE / 2) / f, 1.0, -(row + 0.5 - SIDE / 2) / f])
        d = ray / np.linalg.norm(ray)
        oc = origin - centre
        b = float(d @ oc)
        hit = -b - math.sqrt(b * b - (oc @ oc - RADIUS**2))  # first ray-sphere intersection
        expected = hit * d[1]  # depth = distance along the optical axis
        assert float(drop["depth_metric"][i, 0, row, col]) == pytest.approx(expected, abs=2e-3)
    # the control depth is the clip-normalised inverse of the metric depth
    metric = drop["depth_metric"].double()
    hit = metric < 99
    inverse = 1 / metric[hit]
    want = (inverse - inverse.min()) / (inverse.max() - inverse.min())
    torch.testing.assert_close(drop["depth"].double()[hit], want, atol=1e-5, rtol=0)


def test_masks_are_disjoint_nonempty_and_their_union_is_the_mask(
    drop: dict[str, torch.Tensor],
) -> None:
    masks = drop["masks"]
    assert masks.shape == (FRAMES, 2, SIDE, SIDE)
    assert ((masks == 0) | (masks == 1)).all()
    assert (masks.sum(1) <= 1).all()
    assert (masks.flatten(2).sum(2) > 10).all()
    torch.testing.assert_close(masks.sum(1, keepdim=True), drop["mask"])
    # the ball is red, the crate blue, where their masks say
    rgb = drop["rgb"]
    ball, crate = masks[0, 0].bool(), masks[0, 1].bool()
    assert rgb[0, 0][ball].mean() > rgb[0, 2][ball].mean()
    assert rgb[0, 2][crate].mean() > rgb[0, 0][crate].mean()


def test_two_runs_are_identical(expert: PhysicsExpert, drop: dict[str, torch.Tensor]) -> None:
    again = expert.prepare(Condition(text="drop.yaml")).render()
    assert again.keys() == drop.keys()
    for name in drop:
        assert torch.equal(again[name], drop[name]), name


def test_outputs_shapes_and_ranges(drop: dict[str, torch.Tensor]) -> None:
    assert drop["rgb"].shape == (FRAMES, 3, SIDE, SIDE)
    assert drop["depth"].shape == drop["depth_metric"].shape == (FRAMES, 1, SIDE, SIDE)
    assert float(drop["depth"].min()) >= 0 and float(drop["depth"].max()) == 1.0
    # pixels that see nothing (sky) read far in metres and 0 in the control depth
    sky = drop["depth_metric"] > 99
    assert sky.any() and (drop["depth"][sky] == 0).all()
    # the pixel-space target is 2·rgb − 1 laid out (C, F, H, W)
    torch.testing.assert_close(drop["target"], 2 * drop["rgb"].permute(1, 0, 2, 3) - 1)
    assert drop["target_mask"].shape == drop["target"].shape


def test_scalars_override_the_scene_size(expert: PhysicsExpert) -> None:
    view = expert.prepare(
        Condition(text="drop.yaml", scalars={"width": 32, "height": 24, "frames": 1})
    )
    out = view.render()
    assert out["rgb"].shape == (1, 3, 24, 32)
    assert view.describe().sample_shape == (3, 24, 32)
    assert view.describe().capabilities == {Capability.PROPOSE, Capability.RENDER}


def test_inline_json_and_mjcf_scenes(expert: PhysicsExpert) -> None:
    json_scene = (
        '{"objects": [{"shape": "sphere", "size": [0.2], "position": [0, 0, 0.2]}],'
        ' "camera": {"position": [0, -3, 1], "look_at": [0, 0, 0.2]}, "width": 16, "height": 16}'
    )
    assert expert.prepare(Condition(text=json_scene)).render()["mask"].sum() > 0
    mjcf = """<mujoco><worldbody>
      <camera pos="0 -3 1" xyaxes="1 0 0 0 0.3 1"/>
      <body pos="0 0 0.5"><freejoint/><geom type="sphere" size="0.2"/></body>
      <body pos="0.6 0 0.5"><geom type="box" size="0.1 0.1 0.1"/></body>
    </worldbody></mujoco>"""
    out = expert.prepare(Condition(text=mjcf, scalars={"width": 24, "height": 24})).render()
    assert out["masks"].shape == (1, 2, 24, 24) and (out["masks"].flatten(1).sum(1) > 0).all()


def test_the_constraint_ties_the_objects_to_the_rendering(expert: PhysicsExpert) -> None:
    view = expert.prepare(Condition(text="drop.yaml", scalars={"frames": 1, "weight": 3.0}))
    out = view.render()
    target, mask = out["target"], out["target_mask"]
    x = torch.zeros(2, *target.shape)
    moved = view.propose(x, torch.tensor([1e-6, 1e-6]), seed=1)
    torch.testing.assert_close(moved * mask, target.expand_as(moved) * mask, atol=1e-5, rtol=0)
    assert (moved[:, mask == 0] == 0).all()
    phi = view.log_potential(torch.stack([target, torch.zeros_like(target)]))
    assert float(phi[0]) == 0 and float(phi[1]) == pytest.approx(
        -1.5 * float((mask * target).square().sum()), rel=1e-5
    )
    with pytest.raises(ExpertError) as err:
        view.propose(torch.zeros(1, 3, 8, 8), torch.tensor([0.5]), seed=0)
    assert err.value.field == "x.shape"


# ------------------------------------------------------------------ masks at latent resolution


def test_temporal_groups_follow_the_causal_vae() -> None:
    assert temporal_groups(9, 3) == [range(0, 1), range(1, 5), range(5, 9)]
    assert temporal_groups(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ExpertError):
        temporal_groups(8, 3)


def test_mask_pools_per_latent_cell_and_frame() -> None:
    mask = torch.zeros(5, 8, 8)
    mask[0, :4, :4] = 1  # frame 0: one full 4×4 cell
    mask[1:3, :2, :4] = 1  # frames 1, 2 of group 1: half of a cell
    video = mask_to_sample(mask, (16, 2, 2, 2), "fraction")
    assert video.shape == (16, 2, 2, 2)
    assert float(video[0, 0, 0, 0]) == 1.0 and float(video[0, 1, 0, 0]) == pytest.approx(0.25)
    assert float(video[3, 1, 0, 0]) == pytest.approx(0.25)  # same for every channel
    assert float(mask_to_sample(mask, (16, 2, 2, 2), "any")[0, 1, 0, 0]) == 1.0
    assert float(mask_to_sample(mask, (16, 2, 2, 2), "all")[0, 1, 0, 0]) == 0.0
    image = mask_to_sample(mask[:1], (4, 4, 4), "fraction")
    assert image.shape == (4, 4, 4) and float(image[0, 0, 0]) == 1.0 and image.sum() == 16


def test_control_depth_is_normalised_inverse_depth() -> None:
    depth = np.array([[1.0, 2.0], [4.0, 100.0]])
    hit = depth < 99
    d = control_depth(depth, hit)
    np.testing.assert_allclose(d, [[1.0, 1 / 3], [0.0, 0.0]], atol=1e-6)


def test_base_expert_needs_a_scene(expert: PhysicsExpert) -> None:
    with pytest.raises(ExpertError) as err:
        expert.render()
    assert err.value.field == "handle"


def test_scene_errors_name_the_yaml_path(tmp_path: Path) -> None:
    expert = PhysicsExpert(tmp_path)
    cases = [
        ("objects: [{shape: sphere, size: [0.1]}, {shape: cone, size: [1]}]", "objects[1].shape"),
        ("objects: [{shape: sphere, size: [0.1], mass: -1}]", "objects[0].mass"),
        ("objects: [{shape: box, size: [0.1]}]", "objects[0].size"),
        ("camera: {position: [1, 1, 1], look_at: [1, 1, 1]}", "camera.look_at"),
        ("camera: {position: [0, 0, 5], look_at: [0, 0, 0]}", "camera.up"),
        ("frames: 100000", "frames"),
        ("width: 100000", "width"),
        ("colour: [1, 0, 0]", "colour"),
        ("objects: [{shape: mesh, size: [1], mesh: ../x.obj}]", "objects[0].mesh"),
    ]
    for text, field in cases:
        with pytest.raises(ExpertError) as err:
            expert.prepare(Condition(text=text))
        assert err.value.field == field, (text, err.value)


def test_mjcf_cannot_reach_files_or_exhaust_memory(tmp_path: Path) -> None:
    expert = PhysicsExpert(tmp_path)
    body = '<body pos="0 0 0.5"><geom type="sphere" size="0.2"/></body>'
    camera = '<camera pos="0 -3 0.5" xyaxes="1 0 0 0 0 1"/>'
    # a huge offscreen buffer asked by the file: the render is still the requested size
    huge = f'<mujoco><visual><global offwidth="60000" offheight="60000"/></visual><worldbody>{camera}{body}</worldbody></mujoco>'
    out = expert.prepare(Condition(text=huge, scalars={"width": 16, "height": 16})).render()
    assert out["rgb"].shape == (1, 3, 16, 16) and out["mask"].sum() > 0
    cases = [
        (f'<mujoco><size memory="8G"/><worldbody>{camera}</worldbody></mujoco>', "size.memory",
         ExpertError.resource_exhausted("", "").code),
        ('<mujoco><asset><mesh file="x.stl"></asset></mujoco>', "condition.text",
         ExpertError.invalid("", "").code),
        ('<mujoco><include file="other.xml"/></mujoco>', "condition.text",
         ExpertError.invalid("", "").code),
        ('<mujoco><compiler meshdir="/etc"/></mujoco>', "compiler.meshdir",
         ExpertError.invalid("", "").code),
        ('<mujoco><asset><texture type="cube" fileright="/etc/x.png"/></asset></mujoco>',
         "texture.fileright", ExpertError.invalid("", "").code),
        ("<mujoco>" + " " * (1 << 20) + "</mujoco>", "condition.text",
         ExpertError.resource_exhausted("", "").code),
        (f'<mujoco><option timestep="0"/><worldbody>{camera}</worldbody></mujoco>',
         "option.timestep", ExpertError.invalid("", "").code),
    ]  # fmt: skip
    for text, field, code in cases:
        with pytest.raises(ExpertError) as err:
            expert.prepare(Condition(text=text))
        assert (err.value.field, err.value.code) == (field, code), err.value


def test_mjcf_camera_choice(tmp_path: Path) -> None:
    expert = PhysicsExpert(tmp_path)
    mjcf = """<mujoco><worldbody>
      <camera pos="0 -3 0.5" xyaxes="1 0 0 0 0 1"/>
      <camera pos="3 0 0.5" xyaxes="0 1 0 0 0 1"/>
      <body pos="0.5 0 0.5"><geom type="box" size="0.2 0.1 0.1"/></body>
    </worldbody></mujoco>"""
    size = {"width": 16, "height": 16}
    first = expert.prepare(Condition(text=mjcf, scalars=size)).render()["mask"]
    second = expert.prepare(Condition(text=mjcf, scalars={**size, "camera": 2})).render()["mask"]
    assert first.sum() > 0 and second.sum() > 0 and not torch.equal(first, second)
    with pytest.raises(ExpertError) as err:
        expert.prepare(Condition(text=mjcf, scalars={**size, "camera": 3}))
    assert err.value.field == "condition.text"
    with pytest.raises(ExpertError) as err:
        expert.prepare(Condition(text="objects: []", scalars={"camera": 1}))
    assert err.value.field == "condition.scalars[camera]"
