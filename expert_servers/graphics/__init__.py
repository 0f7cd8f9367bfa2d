"""Graphics expert: a posed mesh rendered with a camera matched to an input image.

For image editing by insertion (the paper's graphics-engine application): a mesh (OBJ, GLB,
GLTF, STL or PLY under the asset root, read with trimesh) is placed at a pose and rendered by
MuJoCo's offscreen renderer — the mesh becomes an ``<mesh>`` asset of a generated MJCF model,
a fixed body, with no ground — from a pinhole camera whose image size and field of view match
the input image. The condition's ``text`` is YAML or JSON::

    mesh: meshes/chair.glb
    scale: [1.0]                   # 1 or 3 factors
    position: [0, 0, 0]            # m, world frame
    euler: [0, 0, 30]              # degrees, extrinsic x-y-z: R = Rz·Ry·Rx (or quaternion)
    colour: [0.8, 0.8, 0.8]
    camera: {position: [3, -4, 2], look_at: [0, 0, 0], up: [0, 0, 1], fov: 50}
    width: 512                     # the input image's size (taken from tensor ``image``
    height: 512                    # when given)

Condition tensors: ``image`` (optional), the picture to insert into, pixels in [0, 1],
``(3, H, W)`` or ``(1, 3, H, W)``; its size sets the render size. Scalars ``fov`` or
``focal_length`` (vertical, degrees or pixels) override the camera's, ``weight`` sets w,
``margin`` (a whole number of pixels r ≥ 0) adds the one-frame masks of an edit by insertion
(for links into single-image factors of sample shape ``(1, H, W)``), with ``opacity``
α ∈ (0, 1] (default 1)::

    silhouette = mask[0]                              # (1, H, W)
    keep       = 1 − dilate_r(silhouette)             # 1 where the input is kept, (1, H, W)
    insert     = α·silhouette                         # a soft mask: a proposal through it
                                                      # moves x only a share α of the way

(dilate_r: the max over the (2r + 1)² square around a pixel).

``render()`` gives what :class:`~poegen.expert_servers.physics.SceneView` gives for one frame
(``rgb`` the render, ``foreground`` = rgb·mask, ``mask`` the mesh's silhouette, ``depth`` control depth,
``depth_metric``, ``intrinsics``, ``extrinsics``) plus, with an input image, ``composite`` =
image·(1 − mask) + rgb·mask. As a constraint the sample space is pixels in [-1, 1] (or the
adapter's autoencoder's latents) and the target is the composite (else the render), tied
inside the mask: the noised-replacement proposal and the Gaussian log-potential of
:class:`~poegen.expert_servers.masked.MaskedTarget`.

``GraphicsAdapter`` takes the same model id (the asset root) and options as
:class:`~poegen.expert_servers.physics.PhysicsAdapter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from poegen.expert_servers.physics import PhysicsAdapter, PhysicsExpert, SceneView
from poegen.expert_servers.physics.engine import Rendering
from poegen.expert_servers.physics.expert import MOVES
from poegen.expert_servers.physics.scene import (
    Camera,
    Scene,
    SceneObject,
    SchemaFieldError,
    first_error,
    load_document,
)
from poegen.expert_servers.server.adapter import (
    Condition,
    ModelRef,
    Progress,
    ServedModel,
)
from poegen.kernel.refusal import ExpertError

__all__ = ["GraphicsAdapter", "GraphicsExpert", "Placement", "keep_mask"]

Finite = Annotated[float, Field(allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1)]
SCALARS = ("fov", "focal_length", "weight", "margin", "opacity")


class Placement(BaseModel):
    """A mesh at a pose, seen by a camera (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mesh: str
    scale: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = (1.0,)
    position: tuple[Finite, Finite, Finite] = (0.0, 0.0, 0.0)
    euler: tuple[Finite, Finite, Finite] | None = None
    quaternion: tuple[Finite, Finite, Finite, Finite] | None = None
    colour: tuple[Unit, Unit, Unit] | tuple[Unit, Unit, Unit, Unit] = (0.8, 0.8, 0.8)
    camera: Camera = Field(default_factory=Camera)
    width: int = Field(64, ge=1)
    height: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Placement:
        if len(self.scale) not in (1, 3):
            raise SchemaFieldError("scale", f"needs 1 or 3 values, got {len(self.scale)}")
        return self

    def scene(self) -> Scene:
        """One fixed mesh object, no ground, one frame."""
        obj = SceneObject(
            name="mesh",
            shape="mesh",
            size=self.scale,
            mesh=self.mesh,
            colour=self.colour,
            position=self.position,
            euler=self.euler,
            quaternion=self.quaternion,
            fixed=True,
        )
        return Scene(
            ground=None,
            objects=[obj],
            camera=self.camera,
            width=self.width,
            height=self.height,
            frames=1,
        )


def _image(condition: Condition) -> Tensor | None:
    image = condition.tensors.get("image")
    if image is None:
        return None
    field = "condition.tensors[image]"
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ExpertError.invalid(field, f"shape {list(image.shape)}, expected (3, H, W)")
    if not image.is_floating_point() or not torch.isfinite(image).all():
        raise ExpertError.invalid(field, "expected finite floating-point pixels")
    if image.min() < 0 or image.max() > 1:
        raise ExpertError.invalid(field, "values must lie in [0, 1]")
    return image.float()


def parse_placement(condition: Condition) -> tuple[Placement, Tensor | None]:
    """The placement of a condition, with the camera matched to its image (if any)."""
    unknown = sorted(set(condition.scalars) - set(SCALARS))
    unknown_tensors = sorted(set(condition.tensors) - {"image"})
    if unknown or unknown_tensors:
        field = (
            f"condition.scalars[{unknown[0]}]"
            if unknown
            else f"condition.tensors[{unknown_tensors[0]}]"
        )
        raise ExpertError.invalid(
            field,
            "not understood (tensors: image; scalars: fov, focal_length, weight, margin, opacity)",
        )
    data = load_document(condition.text) if condition.text.strip() else None
    if not isinstance(data, dict):
        raise ExpertError.invalid(
            "condition.text", "a placement mapping (mesh, pose, camera) is required"
        )
    image = _image(condition)
    data = dict(data)
    if image is not None:
        data["height"], data["width"] = int(image.shape[1]), int(image.shape[2])
    camera = dict(data.get("camera") or {})
    for name in ("fov", "focal_length"):
        if name in condition.scalars:
            camera.pop("fov", None)
            camera.pop("focal_length", None)
            camera[name] = condition.scalars[name]
    if camera:
        data["camera"] = camera
    try:
        return Placement.model_validate(data), image
    except ValidationError as e:
        path, reason = first_error(e)
        raise ExpertError.invalid(path, reason) from None


class GraphicsExpert(PhysicsExpert):
    """Renders placements (module docstring); constraint, condition source."""

    def __init__(self, root: Any, **kw: Any) -> None:
        kw.setdefault("name", "graphics")
        kw.setdefault("model_id", "graphics")
        super().__init__(root, **kw)

    def prepare(self, condition: Condition) -> SceneView:
        placement, image = parse_placement(condition)
        weight = condition.scalars.get("weight", self.weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ExpertError.invalid("condition.scalars[weight]", "must be positive and finite")
        margin = _margin(condition, max(placement.width, placement.height))
        opacity = condition.scalars.get("opacity", 1.0)
        if not 0 < opacity <= 1:
            raise ExpertError.invalid("condition.scalars[opacity]", "must lie in (0, 1]")
        if "opacity" in condition.scalars and margin is None:
            raise ExpertError.invalid("condition.scalars[opacity]", "needs scalar margin")
        rendering = self.simulate(Condition(text=placement.scene().model_dump_json()))
        return InsertionView(self, rendering, weight, image, margin, opacity)


def _margin(condition: Condition, size: int) -> int | None:
    """The scalar ``margin``: a whole number of pixels in [0, size] (beyond the image's size
    every margin keeps nothing), or ``None``."""
    if "margin" not in condition.scalars:
        return None
    margin = condition.scalars["margin"]
    if not (math.isfinite(margin) and 0 <= margin <= size and margin == int(margin)):
        raise ExpertError.invalid(
            "condition.scalars[margin]", f"must be a whole number in [0, {size}]"
        )
    return int(margin)


def keep_mask(silhouette: Tensor, margin: int) -> Tensor:
    """1 − dilate_r(silhouette) for masks ``(1, H, W)``: 0 within ``margin`` pixels (a square
    neighbourhood) of the silhouette, 1 elsewhere."""
    if margin == 0:
        return 1 - silhouette
    grown = torch.nn.functional.max_pool2d(silhouette[None], 2 * margin + 1, 1, margin)[0]
    return 1 - grown


class InsertionView(SceneView):
    """A SceneView whose target is the render composited into the input image."""

    def __init__(
        self,
        parent: GraphicsExpert,
        rendering: Rendering,
        weight: float,
        image: Tensor | None,
        margin: int | None = None,
        opacity: float = 1.0,
    ) -> None:
        self.image = image
        super().__init__(parent, rendering, weight)
        self._outputs["foreground"] = self._outputs["rgb"] * self._outputs["mask"]
        if margin is not None:
            silhouette = self._outputs["mask"][0]  # the one frame, (1, H, W)
            self._outputs["silhouette"] = silhouette
            self._outputs["keep"] = keep_mask(silhouette, margin)
            self._outputs["insert"] = opacity * silhouette

    def target_rgb(self) -> Tensor:
        """image·(1 − mask) + rgb·mask with an input image (also output ``composite``)."""
        if self.image is None:
            return super().target_rgb()
        mask = self._outputs["mask"]
        composite = self.image[None] * (1 - mask) + self._outputs["rgb"] * mask
        self._outputs["composite"] = composite
        return composite


class GraphicsAdapter:
    """Loads a graphics expert for an asset-root directory (options as ``PhysicsAdapter``)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        served = PhysicsAdapter().load(ref, options, progress)
        physics = served.expert
        assert isinstance(physics, PhysicsExpert)
        expert = GraphicsExpert(
            physics.root,
            limits=physics.limits,
            autoencoder=physics.autoencoder,
            latent_space=physics.latent_space,
            weight=physics.weight,
            mask_mode=physics.mask_mode,
            moves=next(k for k, v in MOVES.items() if v == physics.moves),
            model_id=ref.model_id,
        )
        return ServedModel(expert, latent_space=expert.latent_space, concurrent=False)  # MuJoCo
