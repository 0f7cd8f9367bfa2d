"""The physics expert: a MuJoCo scene as condition source and constraint.

``PhysicsExpert.prepare(condition)`` reads a scene, simulates and renders it once, and returns
a :class:`SceneView`, an Expert for that scene:

* ``render()`` (capability ``RENDER``) → named tensors, computed once at ``Prepare``:

  ============== ================ ====================================================
  name           shape            meaning
  ============== ================ ====================================================
  ``rgb``        (F, 3, H, W)     colour in [0, 1]
  ``depth``      (F, 1, H, W)     relative inverse depth in [0, 1], near = 1, nothing
                                  hit = 0: what depth-control models take (``latents``)
  ``depth_metric`` (F, 1, H, W)   metres along the optical axis (``far`` where nothing)
  ``mask``       (F, 1, H, W)     1 on any object (the union of ``masks``), else 0
  ``masks``      (F, K, H, W)     one {0, 1} mask per object, disjoint
  ``positions``  (F, K, 3)        object origins, world frame, metres
  ``times``      (F,)             simulated time of each frame, seconds
  ``intrinsics`` (3, 3)           pinhole K in pixels
  ``extrinsics`` (4, 4)           world → camera, OpenCV axes
  ``target``     S                the rendering in the sample space (see below)
  ``target_mask`` S               the object mask at the sample's resolution
  ============== ================ ====================================================

* as a **constraint** on samples of shape S it is a
  :class:`~poegen.expert_servers.masked.MaskedTarget` tying the objects' region to the
  rendering: ``propose`` replaces the masked region of x_σ by the noised target
  (1 − σ)·x_ref + σ·ε (ε from the kernel's seed), ``project`` is the deterministic shell
  projection, ``log_potential(x0) = −(w/2)·‖m⊙(x0 − x_ref)‖²``. The sample space is
  *pixels* in [-1, 1] without an autoencoder (S = (3, H, W), or (3, F, H, W) for F > 1
  frames; x_ref = 2·rgb − 1), or the *latents* of the autoencoder the adapter was given
  (x_ref = encode(2·rgb − 1), S its shape; the mask is pooled to the latent grid per frame,
  see :mod:`~poegen.expert_servers.physics.latents`).

The condition: ``text`` is the scene — YAML or JSON of the schema in
:mod:`~poegen.expert_servers.physics.scene`, inline MJCF (text starting with ``<``), or the
name of a ``.yaml``/``.yml``/``.json``/``.xml`` file under the asset root; scalars
``width``, ``height``, ``frames``, ``fps`` override the scene's (an MJCF scene takes them only
from here: defaults 64, 64, 1, 16; its first camera renders, or the scalar ``camera``-th,
counting from 1), scalar
``weight`` sets w (default: the adapter's option ``weight``, else 1). The objects of an MJCF
scene are the bodies attached to the world.
"""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path

import mujoco
import numpy as np
import torch
import trimesh
from torch import Tensor

from poegen.expert_servers.masked import MaskedTarget
from poegen.expert_servers.physics.assets import resolve_asset
from poegen.expert_servers.physics.engine import (
    Rendering,
    compile_mjcf,
    object_bodies,
    set_world_velocities,
    simulate_and_render,
)
from poegen.expert_servers.physics.latents import MaskMode, control_depth, mask_to_sample
from poegen.expert_servers.physics.scene import (
    Limits,
    Scene,
    check_limits,
    load_document,
    parse_scene,
    read_scene_text,
    scene_to_mjcf,
)
from poegen.expert_servers.server.adapter import Autoencoder, Condition
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind
from poegen.kernel.refusal import ExpertError

SCENE_SUFFIXES = (".yaml", ".yml", ".json", ".xml")
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".stl", ".ply")
SCALARS = ("width", "height", "frames", "fps", "weight", "camera")
MOVES = {
    "propose": frozenset({Capability.PROPOSE}),
    "project": frozenset({Capability.PROJECT}),
    "both": frozenset({Capability.PROPOSE, Capability.PROJECT}),
    "none": frozenset(),
}
TIES = {
    "weights": frozenset(),
    "score": frozenset({Capability.SCORE, Capability.LOG_PROB}),
}


def load_mesh(root: Path, name: str, field: str, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3), faces (T, 3)) of a mesh file under ``root``, read with trimesh."""
    path = resolve_asset(root, name, field=field, suffixes=MESH_SUFFIXES)
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as e:  # trimesh raises many types for a bad file
        raise ExpertError.invalid(
            field, f"{name!r}: not a readable mesh ({type(e).__name__})"
        ) from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ExpertError.invalid(field, f"{name!r}: holds no triangles")
    if len(mesh.faces) > max_faces:
        raise ExpertError.resource_exhausted(field, f"{len(mesh.faces)} faces, at most {max_faces}")
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


def _positive_int(condition: Condition, name: str, default: int) -> int:
    value = condition.scalars.get(name)
    if value is None:
        return default
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ExpertError.invalid(
            f"condition.scalars[{name}]", f"{value} is not a positive integer"
        )
    return int(value)


class PhysicsExpert:
    """Serves scenes under ``root`` (see the module docstring).

    Args:
        root: the asset root; scenes and meshes are read only from it.
        limits: bounds on frames, resolution, objects and steps.
        autoencoder: the VAE of the sample space (an object with ``encode``), or ``None`` for
            pixels in [-1, 1].
        latent_space: announced name of the sample space.
        weight: default w of the Gaussian tie.
        mask_mode: how pixel masks become latent masks (``fraction``, ``any``, ``all``).
        moves: which particle moves are announced: ``propose``, ``project``, ``both``, ``none``.
        tie: where the Gaussian tie acts: ``weights`` (its log-potential on x̂_0 enters the SMC
            weights and the moves' potential stage) or ``score`` (it announces ``SCORE`` and
            ``LOG_PROB``: its exact noised score joins every MCMC move instead).
        model_id: the id it is served under.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        limits: Limits | None = None,
        autoencoder: Autoencoder | None = None,
        latent_space: str = "",
        weight: float = 1.0,
        mask_mode: MaskMode = "fraction",
        moves: str = "propose",
        tie: str = "weights",
        model_id: str = "physics",
        name: str = "physics",
    ) -> None:
        self.root = Path(root)
        self.limits = limits or Limits()
        self.autoencoder = autoencoder
        self.latent_space = latent_space
        self.weight = float(weight)
        self.mask_mode = mask_mode
        self.moves = MOVES[moves]
        self.tie = TIES[tie]
        self.model_id = model_id
        self.name = name
        self._lock = threading.Lock()  # one offscreen GL context at a time

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name=self.name,
            kind=ExpertKind.CONSTRAINT,
            capabilities=self.moves | self.tie | {Capability.RENDER},
            sample_shape=None,
            model_id=self.model_id,
            revision=f"mujoco-{mujoco.__version__}",
            latent_space=self.latent_space,
        )

    # -- the base expert has no scene: every call needs a prepared handle

    def log_potential(self, x0: Tensor) -> Tensor:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    def render(self) -> dict[str, Tensor]:
        raise ExpertError.failed_precondition("handle", "prepare a scene first (Prepare)")

    # -- scenes

    def prepare(self, condition: Condition) -> SceneView:
        unknown = sorted(set(condition.scalars) - set(SCALARS))
        if unknown or condition.tensors:
            name = unknown[0] if unknown else f"tensors[{sorted(condition.tensors)[0]}]"
            field = f"condition.scalars[{name}]" if unknown else f"condition.{name}"
            raise ExpertError.invalid(field, f"not understood (scalars: {', '.join(SCALARS)})")
        weight = condition.scalars.get("weight", self.weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ExpertError.invalid("condition.scalars[weight]", "must be positive and finite")
        return SceneView(self, self.simulate(condition), weight)

    def simulate(self, condition: Condition) -> Rendering:
        """Parse, bound, compile, simulate and render the condition's scene."""
        text = condition.text.strip()
        if not text:
            raise ExpertError.invalid("condition.text", "a scene is required")
        if "\n" not in text and text.lower().endswith(SCENE_SUFFIXES):
            text = read_scene_text(self.root, text, resolve_asset).strip()
        if text.startswith("<"):
            return self._simulate_mjcf(text, condition)
        return self._simulate_scene(parse_scene(load_document(text)), condition)

    def _simulate_scene(self, scene: Scene, condition: Condition) -> Rendering:
        scene = scene.model_copy(
            update={
                n: _positive_int(condition, n, getattr(scene, n))
                for n in ("width", "height", "frames")
            }
            | {"fps": condition.scalars.get("fps", scene.fps)}
        )
        if not (math.isfinite(scene.fps) and scene.fps > 0):
            raise ExpertError.invalid("condition.scalars[fps]", "must be positive and finite")
        if "camera" in condition.scalars:
            raise ExpertError.invalid("condition.scalars[camera]", "only MJCF scenes have several")
        check_limits(scene, self.limits)
        mjcf = scene_to_mjcf(
            scene, lambda name, field: load_mesh(self.root, name, field, self.limits.max_mesh_faces)
        )
        model = compile_mjcf(mjcf, None, None)

        def initialise(model: mujoco.MjModel, data: mujoco.MjData) -> None:
            for body, obj in zip(object_bodies(model), scene.objects, strict=True):
                set_world_velocities(model, data, body, obj.velocity, obj.angular_velocity)

        return simulate_and_render(
            model,
            width=scene.width,
            height=scene.height,
            frames=scene.frames,
            steps_per_frame=scene.steps_per_frame(),
            initialise=initialise,
            lock=self._lock,
        )

    def _simulate_mjcf(self, xml: str, condition: Condition) -> Rendering:
        size = dict(
            width=_positive_int(condition, "width", 64),
            height=_positive_int(condition, "height", 64),
            frames=_positive_int(condition, "frames", 1),
        )
        fps = condition.scalars.get("fps", 16.0)
        if not (math.isfinite(fps) and fps > 0):
            raise ExpertError.invalid("condition.scalars[fps]", "must be positive and finite")
        model = compile_mjcf(xml, self.root, resolve_asset)
        if not model.opt.timestep > 0:
            raise ExpertError.invalid("option.timestep", "must be positive")
        steps = max(1, round(1 / (fps * model.opt.timestep)))
        bodies = len(object_bodies(model))
        # the same bounds as a schema scene (timestep and objects as compiled)
        probe = Scene(timestep=min(model.opt.timestep, 0.1), fps=fps, **size)
        check_limits(probe, self.limits)
        if bodies > self.limits.max_objects:
            raise ExpertError.resource_exhausted(
                "objects", f"{bodies} bodies, at most {self.limits.max_objects}"
            )
        camera = _positive_int(condition, "camera", 1) - 1 if "camera" in condition.scalars else 0
        return simulate_and_render(
            model, steps_per_frame=steps, camera=camera, lock=self._lock, **size
        )


class SceneView:
    """An Expert for one simulated scene (see the module docstring)."""

    def __init__(self, parent: PhysicsExpert, rendering: Rendering, weight: float) -> None:
        self.parent = parent
        self.rendering = rendering
        self._outputs = rendering_tensors(rendering)
        self._no_target: ExpertError | None = None
        self._constraint: MaskedTarget | None = None
        try:
            target, mask = self._sample_space(parent)
        except ExpertError as e:
            # the autoencoder cannot take this clip (a video through an image VAE): the view
            # still renders, as a condition source; only the constraint refuses
            self._no_target = ExpertError.failed_precondition(
                "handle", f"this scene has no target in the sample space ({e})"
            )
            return
        self._constraint = MaskedTarget(
            target,
            mask,
            weight,
            name=parent.name,
            propose=Capability.PROPOSE in parent.moves,
            project=Capability.PROJECT in parent.moves,
            score=Capability.SCORE in parent.tie,
        )
        self._outputs |= {"target": target, "target_mask": mask}

    @property
    def constraint(self) -> MaskedTarget:
        """The masked-target constraint on the rendering (refused when there is no target)."""
        if self._constraint is None:
            assert self._no_target is not None
            raise self._no_target
        return self._constraint

    def target_rgb(self) -> Tensor:
        """The frames the constraint ties to, ``(F, 3, H, W)`` in [0, 1]: the rendering."""
        return self._outputs["rgb"]

    def _sample_space(self, parent: PhysicsExpert) -> tuple[Tensor, Tensor]:
        rgb = self.target_rgb()  # (F, 3, H, W)
        pixels = 2 * rgb - 1
        mask = self._outputs["mask"][:, 0]  # (F, H, W)
        frames = rgb.shape[0]
        layout = (
            pixels[0] if frames == 1 else pixels.permute(1, 0, 2, 3)
        )  # (3, H, W) / (3, F, H, W)
        if parent.autoencoder is None:
            target = layout
        else:
            latents = parent.autoencoder.encode(layout.unsqueeze(0))
            if not isinstance(latents, Tensor) or latents.shape[0] != 1:
                raise RuntimeError("autoencoder: encode returned a wrong batch")
            target = latents[0].detach().to("cpu", torch.float32)
        return target, mask_to_sample(mask, tuple(target.shape), parent.mask_mode)

    def describe(self) -> ExpertInfo:
        info = self.parent.describe()
        if self._constraint is None:
            return info
        target = self._constraint.target
        digest = hashlib.sha256(target.numpy().tobytes()).hexdigest()[:12]
        return ExpertInfo(
            name=info.name,
            kind=info.kind,
            capabilities=info.capabilities,
            sample_shape=tuple(target.shape),
            model_id=info.model_id,
            revision=f"{info.revision}-{digest}",
            latent_space=info.latent_space,
        )

    def render(self) -> dict[str, Tensor]:
        return dict(self._outputs)

    def log_potential(self, x0: Tensor) -> Tensor:
        return self.constraint.log_potential(self._checked(x0, "x"))

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        return self.constraint.propose(self._checked(x, "x"), sigma, seed)

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.constraint.project(self._checked(x, "x"), sigma)

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The exact score of the noised Gaussian tie (see ``MaskedTarget.score``)."""
        return self.constraint.score(self._checked(x, "x"), sigma)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log q_σ(x_σ) of the noised tie (see ``MaskedTarget.log_prob``)."""
        return self.constraint.log_prob(self._checked(x, "x"), sigma)

    def _checked(self, x: Tensor, field: str) -> Tensor:
        shape = tuple(self.constraint.target.shape)
        if tuple(x.shape[1:]) != shape:
            raise ExpertError.invalid(
                f"{field}.shape", f"sample shape {list(x.shape[1:])}, the scene's is {list(shape)}"
            )
        return x


def rendering_tensors(r: Rendering) -> dict[str, Tensor]:
    """The named tensors of a rendering (the table in the module docstring, less the target)."""
    hit = r.hit()
    k = len(r.names)
    labels = torch.from_numpy(r.labels)
    masks = (
        torch.stack([(labels == i + 1) for i in range(k)], 1).float()
        if k
        else torch.zeros((labels.shape[0], 0, *labels.shape[1:]))
    )
    return {
        "rgb": torch.from_numpy(r.rgb).permute(0, 3, 1, 2).float() / 255,
        "depth": torch.from_numpy(control_depth(r.depth, hit))[:, None],
        "depth_metric": torch.from_numpy(r.depth.copy())[:, None],
        "mask": (labels > 0).float()[:, None],
        "masks": masks,
        "positions": torch.from_numpy(r.positions).float(),
        "times": torch.from_numpy(r.times).float(),
        "intrinsics": torch.from_numpy(r.intrinsics).float(),
        "extrinsics": torch.from_numpy(r.extrinsics).float(),
    }
