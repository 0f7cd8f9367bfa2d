"""Metrics of the physics video recipe (``examples/paper/video``, ``docs/paper-video.md``).

:func:`measure` scores a run's videos against the simulation they were made from: the
**foreground IoU** of the paper's Table 2 (its figures: Depth2V 0.787, Image2V 0.321, PoE
0.739), here without a segmenter. The simulation's foreground is the union of the masks of the
objects that move (their origins change over the clip; a fixed table is background). The
video's foreground is background subtraction: the per-pixel median over the frames is the
background (an object that moves covers a pixel in few frames), and a pixel is foreground where
its colour differs from it by more than ``threshold`` (the RMS over RGB in [0, 1]). Per frame
IoU = |A ∩ B| / |A ∪ B| (1 where both are empty), averaged over frames::

    from poegen.bench.paper_video import measure
    measure(Path("examples/paper/video"), Path("out/paper-video"))
    # {"foreground_iou": ..., "foreground_iou_min": ..., "simulation_iou": ..., "videos": ...}

``simulation_iou`` is the same rule on the simulation's own RGB: the ceiling the rule reaches
on a video that follows the simulation exactly (shadows and anti-aliased edges keep it below
1). Videos: every ``sample_NNN.mp4`` of the folder, or its ``video.mp4`` (the autoregressive
run). The scene is the recipe's ``sources[0]`` condition, rendered in this process (real
MuJoCo) at the video's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

THRESHOLD = 0.1  # RMS colour difference in [0, 1] that counts as foreground


def foreground(frames: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(F, H, W) bool: pixels of ``frames`` (F, H, W, 3) uint8 away from the median frame."""
    rgb = frames.astype(np.float32) / 255.0
    background = np.median(rgb, axis=0, keepdims=True)
    return np.sqrt(np.mean((rgb - background) ** 2, axis=-1)) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per frame IoU of two (F, H, W) bool masks; 1 where both are empty."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def simulate(recipe: Path, width: int, height: int, frames: int) -> dict[str, torch.Tensor]:
    """The recipe's scene rendered at a size (the physics expert in this process)."""
    from poegen.expert_servers.physics import PhysicsAdapter
    from poegen.expert_servers.server import Condition, ModelRef

    spec = yaml.safe_load((recipe / "spec.yaml").read_text())
    scene = spec["sources"][0]["condition"]["text"]
    expert = PhysicsAdapter().load(ModelRef("recipe", recipe), {}, lambda f, m: None).expert
    size = {"width": width, "height": height, "frames": frames}
    return expert.prepare(Condition(text=scene, scalars=size)).render()


def moving_mask(render: dict[str, torch.Tensor]) -> np.ndarray:
    """(F, H, W) bool: the union of the masks of the objects whose origin moves."""
    travel = (render["positions"] - render["positions"][:1]).norm(dim=-1).amax(dim=0)  # (K,)
    moving = travel > 1e-6
    return (render["masks"][:, moving].sum(dim=1) > 0.5).numpy()


def measure(recipe: Path, outputs: Path) -> dict[str, float]:
    """The foreground IoU of the videos in ``outputs`` against ``recipe``'s simulation."""
    import imageio.v2 as imageio

    paths = sorted(outputs.glob("sample_*.mp4")) or [outputs / "video.mp4"]
    videos = [np.stack(imageio.mimread(p)) for p in paths]
    frames, height, width = videos[0].shape[:3]
    render = simulate(recipe, width, height, frames)
    truth = moving_mask(render)
    sim_rgb = (render["rgb"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    scores = [float(iou(foreground(v), truth).mean()) for v in videos]
    return {
        "foreground_iou": float(np.mean(scores)),
        "foreground_iou_min": float(np.min(scores)),
        "simulation_iou": float(iou(foreground(sim_rgb), truth).mean()),
        "videos": float(len(videos)),
    }
