"""The graphics expert on the real engine: a cube mesh at a known pose and field of view lands
where the pinhole camera puts it (corners within a pixel), depth matches, meshes load from the
asset root only (OBJ, GLB, STL), and the render composites into an input image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from poegen.expert_servers.graphics import GraphicsExpert
from poegen.expert_servers.server import Condition
from poegen.kernel.errors import ExpertError

W, H, FOV = 120, 90, 50.0
CAM, LOOK = np.array([3.0, -4.0, 2.5]), np.array([0.0, 0.0, 0.3])
POSITION, EULER = np.array([0.2, 0.1, 0.3]), (20.0, 0.0, 30.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    (root / "meshes").mkdir()
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cube.export(root / "meshes" / "cube.obj")
    cube.export(root / "meshes" / "cube.stl")
    cube.export(root / "meshes" / "cube.glb")
    (root / "meshes" / "broken.obj").write_text("this is not a mesh\n")
    return root


def _placement(mesh: str = "meshes/cube.obj", **extra: object) -> str:
    return json.dumps(
        {
            "mesh": mesh,
            "scale": [1.0],
            "position": POSITION.tolist(),
            "euler": list(EULER),
            "colour": [0.2, 0.7, 0.3],
            "camera": {"position": CAM.tolist(), "look_at": LOOK.tolist(), "fov": FOV},
            "width": W,
            "height": H,
            **extra,
        }
    )


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Extrinsic x-y-z: R = Rz·Ry·Rx."""
    a, b, c = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _project(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection (pixels, pixel i covering [i, i+1)) and depth along the axis."""
    forward = (LOOK - CAM) / np.linalg.norm(LOOK - CAM)
    right = np.cross(forward, [0, 0, 1])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    cam = (points - CAM) @ np.stack([right, down, forward]).T
    f = H / 2 / math.tan(math.radians(FOV) / 2)
    return f * cam[:, :2] / cam[:, 2:] + [W / 2, H / 2], cam[:, 2]


def _corners() -> np.ndarray:
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    return POSITION + (0.5 * signs) @ _rotation(EULER).T


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull, counter-clockwise in (x, y) (monotone chain)."""
    pts = sorted(map(tuple, points))

    def half(seq: list) -> list:
        out: list = []
        for p in seq:
            while (
                len(out) >= 2
                and np.cross(np.subtract(out[-1], out[-2]), np.subtract(p, out[-2])) <= 0
            ):
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _edge_distance(hull: np.ndarray, points: np.ndarray) -> np.ndarray:
    """max over edges of the signed distance outside each edge (≤ 0 inside the polygon)."""
    a, b = hull, np.roll(hull, -1, axis=0)
    edge = b - a
    normal = np.stack([edge[:, 1], -edge[:, 0]], 1) / np.linalg.norm(edge, axis=1)[:, None]
    return ((points[:, None, :] - a[None]) * normal[None]).sum(-1).max(1)


def test_cube_corners_land_at_the_pinhole_projection(root: Path) -> None:
    out = GraphicsExpert(root).prepare(Condition(text=_placement())).render()
    mask = out["mask"][0, 0].numpy() > 0
    assert mask.shape == (H, W) and 200 < mask.sum() < W * H / 2
    hull = _hull(_project(_corners())[0])
    ys, xs = np.nonzero(np.ones_like(mask))
    centres = np.stack([xs + 0.5, ys + 0.5], 1)
    distance = _edge_distance(hull, centres).reshape(H, W)
    # every mask pixel lies within a pixel of the projected silhouette, every pixel a pixel
    # inside it is in the mask
    assert distance[mask].max() < 1.0
    assert mask[distance < -1.0].all()
    # and each projected corner of the silhouette lies within a pixel of a mask pixel (the
    # distance to the nearest pixel square, as the mask covers squares)
    fg = centres[mask.ravel()]
    for corner in hull:
        gap = np.maximum(np.abs(fg - corner) - 0.5, 0)
        assert np.hypot(gap[:, 0], gap[:, 1]).min() < 1.0, corner
    # depth at a pixel well inside matches the nearest face's plane crossing along the ray
    assert float(out["depth_metric"][0, 0][torch.from_numpy(mask)].min()) == pytest.approx(
        _project(_corners())[1].min(), abs=0.02
    )


def test_glb_and_stl_render_like_obj(root: Path) -> None:
    expert = GraphicsExpert(root)
    obj = expert.prepare(Condition(text=_placement())).render()["mask"]
    for name in ("meshes/cube.glb", "meshes/cube.stl"):
        other = expert.prepare(Condition(text=_placement(name))).render()["mask"]
        assert (obj != other).sum() <= 4, name


def test_camera_matches_the_input_image_and_composites(root: Path) -> None:
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    view = GraphicsExpert(root).prepare(
        Condition(text=_placement(), tensors={"image": image}, scalars={"fov": 40.0})
    )
    out = view.render()
    assert out["rgb"].shape == (1, 3, 48, 64) and out["composite"].shape == (1, 3, 48, 64)
    f = 24 / math.tan(math.radians(40) / 2)
    torch.testing.assert_close(out["intrinsics"][0, 0], torch.tensor(f, dtype=torch.float32))
    m = out["mask"][0]
    torch.testing.assert_close(out["composite"][0] * (1 - m), image * (1 - m))
    torch.testing.assert_close(out["composite"][0] * m, out["rgb"][0] * m)
    torch.testing.assert_close(out["target"], 2 * out["composite"][0] - 1)
    torch.testing.assert_close(out["foreground"], out["rgb"] * out["mask"])
    assert out["foreground"][0, :, ~m[0].bool()].abs().max() == 0


@pytest.mark.parametrize(
    ("mesh", "field"),
    [
        ("../outside.obj", "objects[0].mesh"),
        ("/etc/passwd.obj", "objects[0].mesh"),
        ("https://example.com/cube.obj", "objects[0].mesh"),
        ("meshes/missing.obj", "objects[0].mesh"),
        ("meshes/cube.txt", "objects[0].mesh"),
        ("meshes/broken.obj", "objects[0].mesh"),
    ],
)
def test_meshes_only_from_the_asset_root(root: Path, mesh: str, field: str) -> None:
    (root.parent / "outside.obj").write_text((root / "meshes" / "cube.obj").read_text())
    with pytest.raises(ExpertError) as err:
        GraphicsExpert(root).prepare(Condition(text=_placement(mesh)))
    assert err.value.field == field
    assert str(root) not in str(err.value)


def test_bad_placements_name_their_field(root: Path) -> None:
    expert = GraphicsExpert(root)
    for condition, field in [
        (Condition(text=_placement(scale=[1, 2])), "scale"),
        (Condition(text=_placement(colour=[2, 0, 0])), "colour[0]"),
        (Condition(text=_placement(), tensors={"image": torch.zeros(1, 8, 8)}),
         "condition.tensors[image]"),
        (Condition(text=_placement(), scalars={"zoom": 2.0}), "condition.scalars[zoom]"),
        (Condition(text=""), "condition.text"),
    ]:  # fmt: skip
        with pytest.raises(ExpertError) as err:
            expert.prepare(condition)
        assert err.value.field == field, (condition, err.value)
