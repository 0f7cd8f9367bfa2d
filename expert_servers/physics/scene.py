"""The scene schema: a small, validated description of the common case, compiled to MJCF.

A scene is YAML or JSON (or a file of either under the asset root)::

    ground: {size: 10, colour: [0.6, 0.6, 0.6]}      # null: no ground plane
    gravity: [0, 0, -9.81]                           # m/s²
    timestep: 0.001                                  # s, MuJoCo's integration step
    objects:
      - name: ball
        shape: sphere          # sphere | box | capsule | cylinder | ellipsoid | mesh
        size: [0.1]            # sphere: radius; box, ellipsoid: half-extents / radii (3);
                               # capsule, cylinder: [radius, half-length]; mesh: scale (1 or 3)
        mesh: meshes/cube.obj  # shape mesh only: OBJ/GLB/GLTF/STL/PLY under the asset root
        mass: 1.0              # kg, > 0
        colour: [1, 0, 0]      # RGB or RGBA in [0, 1]
        position: [0, 0, 1]    # m, world frame
        euler: [0, 0, 45]      # degrees, extrinsic x-y-z (or quaternion: [w, x, y, z])
        velocity: [0, 0, 0]    # m/s, world frame
        angular_velocity: [0, 0, 0]   # rad/s, world frame
        fixed: false           # true: welded to the world (no free joint)
    camera:
      position: [0, -4, 1]
      look_at: [0, 0, 1]
      up: [0, 0, 1]
      fov: 45                  # vertical field of view in degrees, or
      focal_length: null       # vertical focal length in pixels (then fov = 2·atan(H / 2f))
      near: 0.01               # m, clip planes (depth is metric between them)
      far: 100
    width: 64                  # pixels; the condition's scalars override these four
    height: 64
    frames: 16
    fps: 16

Errors name the path in the document: ``objects[2].mass: Input should be greater than 0``,
``camera.look_at: equals camera.position, the camera looks nowhere``. Sizes are bounded by
:class:`Limits` (frames, pixels per side, objects). Meshes are read with trimesh and written
into the MJCF inline (vertices and faces), so the compiled model never opens a file.

Frames are taken at t_i = i·n·Δt, i = 0 … F−1, with n = round(1/(fps·Δt)) steps between
frames (frame 0 is the initial state).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from xml.sax.saxutils import quoteattr

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from poegen.kernel.refusal import ExpertError

Vec3 = tuple[float, float, float]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1)]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one job's simulation and rendering."""

    max_frames: int = 256
    max_side: int = 1024
    min_side: int = 8
    max_objects: int = 64
    max_steps: int = 1_000_000  # total mj_step calls of one job
    max_mesh_faces: int = 200_000


class Ground(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Finite = Field(10.0, gt=0, description="half-size of the plane in m")
    colour: tuple[Unit, Unit, Unit] | tuple[Unit, Unit, Unit, Unit] = (0.6, 0.6, 0.6)
    friction: Finite = Field(1.0, ge=0)


Shape = Literal["sphere", "box", "capsule", "cylinder", "ellipsoid", "mesh"]
_SIZE_COUNT = {"sphere": (1,), "box": (3,), "ellipsoid": (3,), "capsule": (2,),
               "cylinder": (2,), "mesh": (1, 3)}  # fmt: skip


class SceneObject(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)
    shape: Shape
    size: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = Field(min_length=1)
    mesh: str | None = None
    mass: Finite = Field(1.0, gt=0)
    colour: tuple[Unit, Unit, Unit] | tuple[Unit, Unit, Unit, Unit] = (0.8, 0.2, 0.2)
    position: tuple[Finite, Finite, Finite] = (0.0, 0.0, 0.0)
    euler: tuple[Finite, Finite, Finite] | None = None
    quaternion: tuple[Finite, Finite, Finite, Finite] | None = None
    velocity: tuple[Finite, Finite, Finite] = (0.0, 0.0, 0.0)
    angular_velocity: tuple[Finite, Finite, Finite] = (0.0, 0.0, 0.0)
    fixed: bool = False

    @model_validator(mode="after")
    def _check(self) -> SceneObject:
        counts = _SIZE_COUNT[self.shape]
        if len(self.size) not in counts:
            want = " or ".join(map(str, counts))
            raise SchemaFieldError(
                "size", f"a {self.shape} needs {want} values, got {len(self.size)}"
            )
        if (self.shape == "mesh") != (self.mesh is not None):
            raise SchemaFieldError("mesh", "required for shape mesh, and only for it")
        if self.euler is not None and self.quaternion is not None:
            raise SchemaFieldError("quaternion", "give euler or quaternion, not both")
        if self.quaternion is not None and not any(self.quaternion):
            raise SchemaFieldError("quaternion", "must not be zero")
        return self


class Camera(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    position: tuple[Finite, Finite, Finite] = (0.0, -4.0, 1.0)
    look_at: tuple[Finite, Finite, Finite] = (0.0, 0.0, 0.0)
    up: tuple[Finite, Finite, Finite] = (0.0, 0.0, 1.0)
    fov: Finite | None = Field(None, gt=0, lt=180, description="vertical, degrees")
    focal_length: Finite | None = Field(None, gt=0, description="vertical, pixels")
    near: Finite = Field(0.01, gt=0)
    far: Finite = Field(100.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Camera:
        forward = np.subtract(self.look_at, self.position)
        if np.linalg.norm(forward) < 1e-9:
            raise SchemaFieldError("look_at", "equals camera.position, the camera looks nowhere")
        if np.linalg.norm(np.cross(forward, self.up)) < 1e-9 * np.linalg.norm(forward):
            raise SchemaFieldError("up", "is parallel to the viewing direction (or zero)")
        if self.fov is not None and self.focal_length is not None:
            raise SchemaFieldError("focal_length", "give fov or focal_length, not both")
        if self.far <= self.near:
            raise SchemaFieldError("far", "must exceed camera.near")
        return self

    def fovy(self, height: int) -> float:
        """Vertical field of view in degrees (45 when neither is given)."""
        if self.focal_length is not None:
            return math.degrees(2 * math.atan(height / (2 * self.focal_length)))
        return 45.0 if self.fov is None else self.fov

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors in the world frame."""
        forward = np.subtract(self.look_at, self.position).astype(np.float64)
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, self.up)
        right /= np.linalg.norm(right)
        return right, np.cross(right, forward), forward


class Scene(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ground: Ground | None = Field(default_factory=Ground)
    gravity: tuple[Finite, Finite, Finite] = (0.0, 0.0, -9.81)
    timestep: Finite = Field(0.001, gt=0, le=0.1)
    objects: list[SceneObject] = Field(default_factory=list)
    camera: Camera = Field(default_factory=Camera)
    width: int = Field(64, ge=1)
    height: int = Field(64, ge=1)
    frames: int = Field(1, ge=1)
    fps: Finite = Field(16.0, gt=0)

    def steps_per_frame(self) -> int:
        return max(1, round(1 / (self.fps * self.timestep)))


class SchemaFieldError(ValueError):
    """A validator's error on one field of its model (the path is completed by the parser)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


# ------------------------------------------------------------------ parsing


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def first_error(error: ValidationError) -> tuple[str, str]:
    """(path, reason) of the first problem; validator errors complete the path themselves."""
    item = error.errors(include_url=False)[0]
    loc = tuple(p for p in item["loc"] if not str(p).startswith("function-"))
    cause = item.get("ctx", {}).get("error")
    if isinstance(cause, SchemaFieldError):
        return _loc((*loc, cause.field)), cause.reason
    # tagged tuple/literal unions append the member's type name: drop it
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("tuple[", "literal["))))
    return _loc(loc) or "scene", item["msg"]


def parse_scene(data: Any, *, field: str = "condition.text") -> Scene:
    """Validate a decoded document; ``ExpertError`` naming the document path (``objects[2].mass``)."""
    if not isinstance(data, dict):
        raise ExpertError.invalid(field, f"a scene must be a mapping, got {type(data).__name__}")
    try:
        return Scene.model_validate(data)
    except ValidationError as e:
        path, reason = first_error(e)
        raise ExpertError.invalid(path, reason) from None


def load_document(text: str, *, field: str = "condition.text") -> Any:
    """JSON or YAML (safe loader) text → Python data (at most 1 MiB of text)."""
    if len(text) > 1 << 20:
        raise ExpertError.resource_exhausted(field, "a scene of over 1 MiB of text")
    try:
        return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ExpertError.invalid(field, f"not valid YAML/JSON ({type(e).__name__})") from None


def check_limits(scene: Scene, limits: Limits) -> None:
    """RESOURCE_EXHAUSTED over the bounds, naming the scene field."""
    if scene.frames > limits.max_frames:
        raise ExpertError.resource_exhausted(
            "frames", f"{scene.frames} frames, at most {limits.max_frames}"
        )
    for side in ("width", "height"):
        value = getattr(scene, side)
        if value > limits.max_side:
            raise ExpertError.resource_exhausted(side, f"{value} pixels, at most {limits.max_side}")
        if value < limits.min_side:
            raise ExpertError.invalid(side, f"{value}, at least {limits.min_side}")
    if len(scene.objects) > limits.max_objects:
        raise ExpertError.resource_exhausted(
            "objects", f"{len(scene.objects)} objects, at most {limits.max_objects}"
        )
    steps = (scene.frames - 1) * scene.steps_per_frame()
    if steps > limits.max_steps:
        raise ExpertError.resource_exhausted(
            "frames", f"{steps} simulation steps, at most {limits.max_steps}"
        )


# ------------------------------------------------------------------ MJCF


def _f(values: Any) -> str:
    return " ".join(f"{float(v):.9g}" for v in np.ravel(values))


def _rgba(colour: tuple[float, ...]) -> str:
    return _f((*colour, 1.0) if len(colour) == 3 else colour)


def camera_xml(camera: Camera, height: int, name: str = "view") -> str:
    """A world camera at ``camera.position`` looking at ``look_at`` (MuJoCo looks along −z)."""
    right, up, _ = camera.axes()
    return (
        f'<camera name="{name}" pos="{_f(camera.position)}" '
        f'xyaxes="{_f(right)} {_f(up)}" fovy="{camera.fovy(height):.9g}"/>'
    )


def header_xml(width: int, height: int, near: float, far: float) -> str:
    """Offscreen buffer size; statistic extent 1, so znear/zfar are in metres."""
    return (
        '<compiler angle="degree" eulerseq="XYZ"/>'
        '<statistic extent="1" center="0 0 0"/>'
        f'<visual><global offwidth="{width}" offheight="{height}"/>'
        f'<map znear="{near:.9g}" zfar="{far:.9g}"/>'
        '<quality shadowsize="0"/><headlight ambient="0.4 0.4 0.4" diffuse="0.5 0.5 0.5"/>'
        "</visual>"
    )


MeshLoader = Callable[[str, str], tuple[np.ndarray, np.ndarray]]
"""``load(name, field) -> (vertices (V, 3), faces (T, 3))`` of a mesh under the asset root."""


def mesh_asset_xml(name: str, vertices: np.ndarray, faces: np.ndarray, scale: Any) -> str:
    return (
        f'<mesh name="{name}" vertex="{_f(vertices)}" face="{" ".join(map(str, np.ravel(faces)))}" '
        f'scale="{_f(np.broadcast_to(np.asarray(scale, dtype=float), (3,)))}"/>'
    )


def _orientation(obj: SceneObject) -> str:
    if obj.quaternion is not None:
        return f' quat="{_f(obj.quaternion)}"'
    if obj.euler is not None:
        return f' euler="{_f(obj.euler)}"'
    return ""


def object_name(obj: SceneObject, index: int) -> str:
    return obj.name or f"object{index}"


def scene_to_mjcf(scene: Scene, load_mesh: MeshLoader | None) -> str:
    """The MJCF text of a validated scene (meshes inline, no file references)."""
    assets, bodies = [], []
    names = [object_name(o, i) for i, o in enumerate(scene.objects)]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        i = names.index(dup, names.index(dup) + 1)
        raise ExpertError.invalid(f"objects[{i}].name", f"{dup!r} is used twice")
    for i, (obj, name) in enumerate(zip(scene.objects, names, strict=True)):
        if obj.shape == "mesh":
            if load_mesh is None or obj.mesh is None:
                raise ExpertError.invalid(f"objects[{i}].mesh", "no mesh loader")
            v, f = load_mesh(obj.mesh, f"objects[{i}].mesh")
            assets.append(mesh_asset_xml(f"mesh_{name}", v, f, obj.size))
            geom = f'type="mesh" mesh="mesh_{name}"'
        else:
            geom = f'type="{obj.shape}" size="{_f(obj.size)}"'
        joint = "" if obj.fixed else f'<freejoint name="joint_{name}"/>'
        bodies.append(
            f'<body name={quoteattr(name)} pos="{_f(obj.position)}"{_orientation(obj)}>{joint}'
            f'<geom name="geom_{name}" {geom} mass="{obj.mass:.9g}" rgba="{_rgba(obj.colour)}"/>'
            "</body>"
        )
    ground = ""
    if scene.ground is not None:
        g = scene.ground
        ground = (
            f'<geom name="ground" type="plane" size="{g.size:.9g} {g.size:.9g} 0.1" '
            f'rgba="{_rgba(g.colour)}" friction="{g.friction:.9g} 0.005 0.0001"/>'
        )
    cam = scene.camera
    return (
        '<mujoco model="scene">'
        + header_xml(scene.width, scene.height, cam.near, cam.far)
        + f'<option timestep="{scene.timestep:.9g}" gravity="{_f(scene.gravity)}"/>'
        + f"<asset>{''.join(assets)}</asset>"
        + '<worldbody><light directional="true" castshadow="false" pos="0 0 10" dir="0 0 -1"/>'
        + ground
        + camera_xml(cam, scene.height)
        + "".join(bodies)
        + "</worldbody></mujoco>"
    )


def read_scene_text(root: Path, name: str, resolve: Callable[..., Path]) -> str:
    """The text of a scene file under the root (at most 1 MiB)."""
    path = resolve(root, name, field="condition.text", suffixes=(".yaml", ".yml", ".json", ".xml"),
                   max_bytes=1 << 20)  # fmt: skip
    return path.read_text(encoding="utf-8")
