"""MuJoCo as the engine: compile MJCF, simulate, render offscreen.

:func:`compile_mjcf` turns MJCF text into an ``mujoco.MjModel``; file references
(``<mesh file=…>``, ``<texture file=…>``, ``<hfield file=…>``) are resolved under the asset
root and handed to MuJoCo as an in-memory asset dictionary, so MuJoCo itself never opens a
path; ``<include>`` and the compiler's ``meshdir``/``texturedir``/``assetdir`` are refused.
MuJoCo's parse and compile errors come back as INVALID_ARGUMENT on ``condition.text`` carrying
MuJoCo's own message.

:func:`simulate_and_render` steps the model and renders every frame from one camera with
``mujoco.Renderer`` (offscreen; ``MUJOCO_GL`` is set to ``egl`` by this package unless the
environment already chose a backend) into a :class:`Rendering`:

* ``rgb`` ``(F, H, W, 3)`` uint8;
* ``depth`` ``(F, H, W)`` float32, metric: distance along the optical axis in metres (MuJoCo's
  renderer linearises the depth buffer with the model's znear/zfar; the builders here set the
  model extent to 1 so those are metres). Pixels that hit nothing read ``far``;
* ``labels`` ``(F, H, W)`` int64: 0 for nothing or the static world (ground), k + 1 for object
  k, where objects are the bodies attached directly to the world (one object per subtree);
* ``positions`` ``(F, K, 3)`` object origins in the world frame; ``times`` ``(F,)`` seconds;
* ``intrinsics`` ``(3, 3)`` pinhole K in pixels (principal point at the image centre, pixel i
  covering [i, i + 1)); ``extrinsics`` ``(4, 4)`` world → camera in the OpenCV convention
  (x right, y down, z forward), so p_pixel ~ K·(R·p_world + t).

The engine has no randomness: a scene renders bit-identically every time on one machine.
"""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco

from poegen.kernel.refusal import ExpertError

_FILE_TAGS = {"mesh", "texture", "hfield", "skin", "model"}
_FILE_WORDS = re.compile(r"file|include|meshdir|texturedir|assetdir", re.IGNORECASE)
MAX_MJCF_CHARS = 1 << 20
MAX_ARENA_BYTES = 256 << 20
MAX_GEOMS = 10_000
_ASSET_SUFFIXES = (".obj", ".stl", ".msh", ".png")


@dataclass(frozen=True, slots=True)
class Rendering:
    """Frames of one camera (see the module docstring for shapes and units)."""

    rgb: np.ndarray
    depth: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    positions: np.ndarray
    times: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    near: float
    far: float

    def hit(self) -> np.ndarray:
        """Pixels that hit geometry, ``(F, H, W)`` bool."""
        return self.depth < self.far * (1 - 1e-4)


Resolver = Callable[..., Path]


def compile_mjcf(xml: str, root: Path | None, resolve: Resolver | None) -> mujoco.MjModel:
    """MjModel of MJCF text; file references only from the asset root (module docstring)."""
    assets: dict[str, bytes] = {}
    if len(xml) > MAX_MJCF_CHARS:
        raise ExpertError.resource_exhausted("condition.text", f"over {MAX_MJCF_CHARS} characters")
    try:
        tree = ET.fromstring(xml)
    except ET.ParseError:
        # let MuJoCo word the parse error, unless the text might name files we cannot check
        if _FILE_WORDS.search(xml):
            raise ExpertError.invalid(
                "condition.text", "MJCF that names files or includes must be well-formed XML"
            ) from None
        tree = None
    if tree is not None:
        for element in tree.iter():
            if element.tag == "include":
                raise ExpertError.invalid("condition.text", "MJCF <include> is not supported")
            if element.tag == "compiler":
                for attr in ("meshdir", "texturedir", "assetdir"):
                    if attr in element.attrib:
                        raise ExpertError.invalid(
                            f"compiler.{attr}", "not supported; name files under the asset root"
                        )
            # file, and a cube texture's fileright, fileleft, fileup, …
            for attr, name in element.attrib.items():
                if not attr.lower().startswith("file"):
                    continue
                field = f"{element.tag}.{attr}"
                if element.tag not in _FILE_TAGS or root is None or resolve is None:
                    raise ExpertError.invalid(field, "file references are not allowed here")
                path = resolve(root, name, field=field, suffixes=_ASSET_SUFFIXES)
                assets[name] = path.read_bytes()
    try:
        model = mujoco.MjModel.from_xml_string(xml, assets)
    except ValueError as e:
        raise ExpertError.invalid("condition.text", f"MuJoCo: {str(e).strip()}") from None
    if model.narena > MAX_ARENA_BYTES:  # <size memory=…>: MjData would allocate it
        raise ExpertError.resource_exhausted(
            "size.memory", f"{model.narena} bytes of simulation memory, at most {MAX_ARENA_BYTES}"
        )
    if model.ngeom > MAX_GEOMS:
        raise ExpertError.resource_exhausted(
            "condition.text", f"{model.ngeom} geoms, at most {MAX_GEOMS}"
        )
    return model


def object_bodies(model: mujoco.MjModel) -> list[int]:
    """Bodies attached directly to the world, in order: one object each."""
    return [b for b in range(1, model.nbody) if model.body_parentid[b] == 0]


def body_name(model: mujoco.MjModel, body: int) -> str:
    return mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, body) or f"body{body}"


def set_world_velocities(
    model: mujoco.MjModel, data: mujoco.MjData, body: int, linear, angular
) -> None:
    """Free-joint velocities of ``body`` from world-frame linear and angular velocity.

    MuJoCo's free joint takes the angular part in the body frame: ω_body = Rᵀ·ω_world.
    """
    joints = [j for j in range(model.njnt) if model.jnt_bodyid[j] == body]
    free = [j for j in joints if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE]
    if not free:
        return
    adr = model.jnt_dofadr[free[0]]
    rotation = data.xmat[body].reshape(3, 3)
    data.qvel[adr : adr + 3] = linear
    data.qvel[adr + 3 : adr + 6] = rotation.T @ np.asarray(angular, dtype=np.float64)


def camera_matrices(
    model: mujoco.MjModel, data: mujoco.MjData, camera: int, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """(K, world→camera 4×4 in the OpenCV convention) of a MuJoCo camera."""
    f = 0.5 * height / math.tan(math.radians(model.cam_fovy[camera]) / 2)
    k = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    axes = data.cam_xmat[camera].reshape(3, 3)  # columns: camera x (right), y (up), z (back)
    r = np.stack([axes[:, 0], -axes[:, 1], -axes[:, 2]])  # rows: OpenCV x, y, z in world
    extrinsics = np.eye(4)
    extrinsics[:3, :3] = r
    extrinsics[:3, 3] = -r @ data.cam_xpos[camera]
    return k, extrinsics


def simulate_and_render(
    model: mujoco.MjModel,
    *,
    width: int,
    height: int,
    frames: int,
    steps_per_frame: int,
    camera: int = 0,
    initialise: Callable[[mujoco.MjModel, mujoco.MjData], None] | None = None,
    lock: threading.Lock | None = None,
) -> Rendering:
    """Step and render ``frames`` frames (frame 0: the initial state)."""
    if model.ncam <= camera:
        raise ExpertError.invalid(
            "condition.text", f"the scene has {model.ncam} camera(s), camera {camera + 1} asked for"
        )
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    if initialise is not None:
        initialise(model, data)
        mujoco.mj_forward(model, data)
    bodies = object_bodies(model)
    label_of_body = np.zeros(model.nbody, dtype=np.int64)
    for k, b in enumerate(bodies):
        label_of_body[model.body_rootid == b] = k + 1
    label_of_geom = np.concatenate([[0], label_of_body[model.geom_bodyid]])  # −1 → index 0
    near = float(model.vis.map.znear * model.stat.extent)
    far = float(model.vis.map.zfar * model.stat.extent)
    rgb = np.empty((frames, height, width, 3), np.uint8)
    depth = np.empty((frames, height, width), np.float32)
    labels = np.empty((frames, height, width), np.int64)
    positions = np.empty((frames, len(bodies), 3))
    times = np.empty(frames)
    k, extrinsics = camera_matrices(model, data, camera, width, height)
    # the offscreen buffer is exactly the render size (an MJCF may ask for a huge one)
    model.vis.global_.offwidth, model.vis.global_.offheight = width, height
    with lock or threading.Lock(), _Offscreen(model, width, height) as renderer:
        for i in range(frames):
            if i:
                for _ in range(steps_per_frame):
                    mujoco.mj_step(model, data)
            times[i] = data.time
            positions[i] = data.xpos[bodies] if bodies else np.empty((0, 3))
            renderer.update_scene(data, camera=camera)
            rgb[i] = renderer.render()
            renderer.enable_depth_rendering()
            depth[i] = renderer.render()
            renderer.disable_depth_rendering()
            renderer.enable_segmentation_rendering()
            seg = renderer.render()
            renderer.disable_segmentation_rendering()
            geom = np.where(seg[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, seg[..., 0], -1)
            labels[i] = label_of_geom[geom + 1]
    names = tuple(body_name(model, b) for b in bodies)
    return Rendering(rgb, depth, labels, names, positions, times, k, extrinsics, near, far)


class _Offscreen:
    """``mujoco.Renderer`` as a context manager: closed on exit, start-up errors named."""

    def __init__(self, model: mujoco.MjModel, width: int, height: int) -> None:
        self.args = (model, height, width)

    def __enter__(self) -> mujoco.Renderer:
        try:
            self.renderer = mujoco.Renderer(*self.args)
        except ValueError as e:  # e.g. larger than the model's offscreen buffer
            raise ExpertError.invalid("width", f"MuJoCo: {e}") from None
        return self.renderer

    def __exit__(self, *exc: object) -> None:
        self.renderer.close()
