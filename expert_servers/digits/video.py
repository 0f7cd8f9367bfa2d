"""Physics-driven video with digit experts: a digit that falls, bounces and flies like a ball.

The paper's third application (a physics simulator drives a video) in the digits world. The
physics expert (:mod:`poegen.expert_servers.physics`, real MuJoCo) simulates :data:`SCENE`: a
ball dropped onto a ramp bounces off it to the right, falls and bounces off the floor. The
ball's per-frame origin, projected by the scene camera's pinhole (``intrinsics``,
``extrinsics`` of its Render), is the centre of the frame's 16×16 box (:func:`trajectory`,
:func:`boxes`). The video is ``(frames, 32, 48)``: grey frames in [-1, 1], the frame axis
first. A factor's ``crop`` over (frame, row, column) ``[[f, f+1], [t, t+16], [l, l+16]]`` then
shows an expert the window ``(1, 16, 16)``: exactly the one-channel digit the prior was trained
on (the frame axis stands where its channel axis is, so no singleton frame axis appears). The
factors, per frame f:

* the class-conditional prior ``flow-cond`` prepared with the label, cropped to box f;
* the background ``blank_canvas`` (:mod:`.background`) cropped to frame f, its region the
  complement of the boxes (where no box is, the frame is empty);
* the reward classifier λ·log p(label | x̂_0[box f]), cropped to box f;
* for f > 0, the temporal tie :class:`~poegen.expert_servers.digits.tie.FrameTie` between the
  digit's crops in frames f − 1 and f (cropped to the two frames).

The target is Π_f p(x_f[b_f] | y)·p_bg(x_f outside b_f)·p(y | x̂_0,f[b_f])^λ ·
Π_{f>0} tie(x_f[b_f], x_{f−1}[b_{f−1}]).

**Autoregressive annealing** (:mod:`poegen.clients.autoregressive`): the frames are made in
chunks of :data:`CHUNK` frames, one Sampler job per chunk. Chunk k's job targets the product
over the frames so far with the frames already made fixed: of its factors only those touching
the new frames are left, and the tie across the chunk boundary is **anchored** to the previous
chunk's last frame (its box content r enters the tie's condition as the tensor ``reference``).
:func:`chunk_spec` writes chunk k's spec; ``chunk_spec(…, Chunk(0, 0, F))`` is the one job
annealing all frames jointly (a baseline), ``ties=False`` the independent frames (another).

Metrics (:func:`video_metrics`, one video at a time): the centroid error — pixels (x + 1)/2
brighter than 0.25 weighted by their brightness, their centroid per frame against the projected
simulated position, the mean distance in pixels —; the label consistency — the share of frames
whose box crop the judge (``classifier-judge``, which steers nothing) gives the label —; the
appearance change — the root mean square difference, in [0, 1] pixels, of the digit's crops in
consecutive frames, averaged over frame pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.expert_servers.digits.train import LABEL_NAMES
from poegen.kernel.spec import SamplerSettings

FRAMES = 12
HEIGHT, WIDTH = 32, 48
CANVAS = (FRAMES, HEIGHT, WIDTH)
BOX_SIZE = 16
LABEL = 3
CHUNK = 4  # frames per autoregressive chunk
FPS = 10.0  # simulated frames per second
REWARD_WEIGHT = 4.0
TIE_WEIGHT = 8.0
BACKGROUND_STD = 0.05
STEP_SIZE = 0.2
INK = 0.25  # a pixel in [0, 1] brighter than this is ink (centroids)
SCENE_FILE = "throw.xml"
# A ball (radius 0.1 m) dropped onto a ramp tilted by 20° bounces off it to the right, falls
# and bounces off the floor. Stiff, lightly damped contacts (solref: −stiffness −damping)
# make it bounce: MuJoCo's default contact is critically damped and a ball would only roll.
# The camera looks along +y from 5 m; fovy = 2·atan(0.2) = 22.62° makes 32 pixels span 2 m:
# 16 pixels per metre at the ball's depth, the world origin at column 24 + 16·0.3, row 24.
SCENE = """<mujoco model="throw">
  <option timestep="0.001" gravity="0 0 -9.81"/>
  <worldbody>
    <light directional="true" pos="0 0 10" dir="0 0 -1"/>
    <geom name="floor" type="plane" size="5 5 0.1" rgba="0.6 0.6 0.6 1"/>
    <geom name="ramp" type="box" size="0.3 0.5 0.02" pos="-1.0 0 0.45" euler="0 20 0"
          rgba="0.5 0.5 0.5 1"/>
    <camera name="view" pos="-0.3 -5 0.5" xyaxes="1 0 0 0 0 1" fovy="22.62"/>
    <body name="ball" pos="-1.0 0 0.85">
      <freejoint/>
      <geom name="ball" type="sphere" size="0.1" mass="1" rgba="1 1 1 1"
            solref="-4000 -3"/>
    </body>
  </worldbody>
</mujoco>
"""


def scene_scalars(frames: int = FRAMES) -> dict[str, float]:
    """The physics condition's scalars: the render size, frames and frame rate."""
    return {"width": float(WIDTH), "height": float(HEIGHT), "frames": float(frames), "fps": FPS}


def write_assets(root: Path) -> Path:
    """The physics expert's asset root: :data:`SCENE` as ``throw.xml``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / SCENE_FILE).write_text(SCENE)
    return root


def simulate(root: Path, frames: int = FRAMES) -> dict[str, Tensor]:
    """The scene's Render from the physics expert in process (asset root ``root``)."""
    from poegen.expert_servers.physics import PhysicsExpert
    from poegen.expert_servers.server.adapter import Condition

    condition = Condition(text=SCENE_FILE, scalars=scene_scalars(frames))
    return PhysicsExpert(root).prepare(condition).render()


def trajectory(render: dict[str, Tensor], body: int = 0) -> Tensor:
    """Pixel coordinates ``(F, 2)`` = (column, row) of object ``body``'s origin per frame.

    p_cam = R·p + t (``extrinsics``, OpenCV axes), (u, v, 1) ∝ K·p_cam (``intrinsics``);
    pixel i covers [i, i + 1), so a pixel's centre is at i + ½.
    """
    positions = render["positions"][:, body].to(torch.float64)  # (F, 3)
    extrinsics = render["extrinsics"].to(torch.float64)
    intrinsics = render["intrinsics"].to(torch.float64)
    camera = positions @ extrinsics[:3, :3].T + extrinsics[:3, 3]
    if (camera[:, 2] <= 0).any():
        raise ValueError("render: the object is behind the camera in some frame")
    projected = camera @ intrinsics.T
    return (projected[:, :2] / projected[:, 2:]).float()


@dataclass(frozen=True, slots=True)
class FrameBox:
    """Frame ``frame``'s 16×16 box (its top-left pixel)."""

    frame: int
    top: int
    left: int

    def window(self, frame: int | None = None) -> list[tuple[int, int]]:
        """The crop over (frame, row, column); ``frame`` overrides the frame index (a box's
        frame inside a chunk)."""
        f = self.frame if frame is None else frame
        return [(f, f + 1), (self.top, self.top + BOX_SIZE), (self.left, self.left + BOX_SIZE)]

    def of(self, frame: Tensor) -> Tensor:
        """The box's crop of frames ``(..., H, W)``."""
        return frame[..., self.top : self.top + BOX_SIZE, self.left : self.left + BOX_SIZE]


def boxes(centres: Tensor, height: int = HEIGHT, width: int = WIDTH) -> tuple[FrameBox, ...]:
    """A box per frame centred (to the nearest pixel) on ``centres`` ``(F, 2)`` (column, row),
    moved inside the frame where it would leave it."""
    out = []
    for f, (u, v) in enumerate(centres.tolist()):
        top = min(max(round(v - BOX_SIZE / 2), 0), height - BOX_SIZE)
        left = min(max(round(u - BOX_SIZE / 2), 0), width - BOX_SIZE)
        out.append(FrameBox(f, top, left))
    return tuple(out)


def background_region(frame_boxes: Sequence[FrameBox], height: int = HEIGHT,
                      width: int = WIDTH) -> Tensor:  # fmt: skip
    """``(F, H, W)``: 1 outside frame f's box in frame f, 0 inside."""
    region = torch.ones((len(frame_boxes), height, width))
    for i, box in enumerate(frame_boxes):
        box.of(region[i]).zero_()
    return region


def settings(particles: int = 16, steps: int = 12) -> SamplerSettings:
    """poegen's settings per chunk: SMC over ``steps`` levels, one Langevin move per level."""
    return SamplerSettings(
        num_particles=particles, num_steps=steps, mcmc_steps=1, step_size=STEP_SIZE
    )


def chunk_spec(
    frame_boxes: Sequence[FrameBox],
    start: int,
    stop: int,
    files: dict[str, Any],
    *,
    label: int = LABEL,
    reference: dict[str, Any] | None = None,
    ties: bool = True,
    rewards: bool = True,
    seed: int = 0,
    sampler: SamplerSettings | None = None,
) -> dict[str, Any]:
    """The spec mapping of the job making frames [start, stop) (endpoint names of
    ``examples/video/stack.yaml``: ``digit``, ``background``, ``tie``, ``reward``).

    ``files["region"]``: a tensor file of :func:`background_region` of these frames (a
    ``{"file", "key"}`` mapping); ``reference``: a tensor file of the previous frame's box
    content, which anchors the first frame's tie (autoregressive chunks after the first).
    """
    chosen = (sampler or settings()).model_dump(
        include={"num_particles", "num_steps", "mcmc_steps", "step_size"}
    )
    name = LABEL_NAMES[label]
    experts: list[dict[str, Any]] = []
    full = [(0, HEIGHT), (0, WIDTH)]
    for i, box in enumerate(frame_boxes[start:stop]):
        f = start + i
        experts.append({"endpoint": "digit", "name": f"digit-{f}",
                        "condition": {"scalars": {"class_label": label}},
                        "crop": box.window(i)})  # fmt: skip
        experts.append({"endpoint": "background", "name": f"background-{f}",
                        "region": {"mask": files["region"]}, "crop": [(i, i + 1), *full]})  # fmt: skip
    if ties:
        for i in range(stop - start):
            f = start + i
            if i == 0 and reference is None:
                continue  # frame 0 of the video, or of a run of independent chunks
            prev, box = frame_boxes[f - 1], frame_boxes[f]
            scalars = {"top1": box.top, "left1": box.left}
            condition: dict[str, Any] = {"scalars": scalars}
            if i == 0:
                condition["tensors"] = {"reference": reference}
                crop = [(0, 1), *full]
            else:
                scalars |= {"top0": prev.top, "left0": prev.left}
                crop = [(i - 1, i + 1), *full]
            experts.append({"endpoint": "tie", "name": f"tie-{f}", "condition": condition,
                            "crop": crop})  # fmt: skip
    if rewards:
        for i, box in enumerate(frame_boxes[start:stop]):
            experts.append({"endpoint": "reward", "name": f"is-{name}-{start + i}",
                            "weight": REWARD_WEIGHT, "condition": {"text": name},
                            "crop": box.window(i)})  # fmt: skip
    return {
        "seed": seed, "sample_shape": [stop - start, HEIGHT, WIDTH], "settings": chosen,
        "experts": experts, "output": {"decode": "none"},
    }  # fmt: skip


# --------------------------------------------------------------------------- metrics


def centroids(video: Tensor) -> Tensor:
    """Per frame ``(F, 2)`` (column, row): the brightness-weighted centroid of the ink (pixels
    (x + 1)/2 brighter than :data:`INK`) of grey frames ``(F, H, W)`` in [-1, 1]; NaN for a
    frame without ink."""
    from poegen.expert_servers.digits.compose import to_pixels

    pixels = to_pixels(video.float())
    ink = torch.where(pixels > INK, pixels, torch.zeros_like(pixels))
    _, height, width = video.shape
    rows = torch.arange(height, dtype=torch.float32) + 0.5
    cols = torch.arange(width, dtype=torch.float32) + 0.5
    mass = ink.sum((1, 2))
    u = (ink.sum(1) * cols).sum(1) / mass
    v = (ink.sum(2) * rows).sum(1) / mass
    return torch.stack([u, v], 1)


def box_crops(video: Tensor, frame_boxes: Sequence[FrameBox]) -> Tensor:
    """``(F, 1, 16, 16)``: each frame's box crop."""
    return torch.stack([box.of(video[i]) for i, box in enumerate(frame_boxes)])[:, None]


def video_metrics(
    judge: Any, video: Tensor, frame_boxes: Sequence[FrameBox], centres: Tensor,
    label: int = LABEL,
) -> dict[str, float]:  # fmt: skip
    """One video ``(F, H, W)``: centroid error (pixels), label consistency (share of frames),
    appearance change (RMS of consecutive box crops, [0, 1] pixels)."""
    from poegen.expert_servers.digits.compose import to_pixels

    found = centroids(video)
    error = (found - centres).norm(dim=1)
    # a frame without ink has no centroid: count it as the farthest a digit can be
    diagonal = math.hypot(video.shape[1], video.shape[2])
    error = torch.where(torch.isfinite(error), error, torch.full_like(error, diagonal))
    crops = to_pixels(box_crops(video, frame_boxes).float())
    classes = judge.log_probs(crops.contiguous()).argmax(-1)
    change = (crops[1:] - crops[:-1]).square().flatten(1).mean(1).sqrt()
    return {
        "centroid_error_px": float(error.mean()),
        "label_consistency": float((classes == label).float().mean()),
        "appearance_change": float(change.mean()),
    }
