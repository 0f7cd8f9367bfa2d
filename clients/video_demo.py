"""``poegen demo --app video``: a digit moving along a simulated trajectory, through a local stack.

The video application of :mod:`poegen.expert_servers.digits.video` with every expert a
``poegen serve`` process (the stack of ``examples/video/stack.yaml``: the class-conditional
prior ``digit``, the ``background``, the temporal ``tie``, the ``reward`` classifier and the
``physics`` expert on the asset root) and every job a client request to the Sampler service.
The physics expert is asked once for its Render of the scene (``positions``, the camera's
``intrinsics`` and ``extrinsics``): the projected trajectory gives the frames' boxes. Then, at
equal expert evaluations:

* ``poegen``: autoregressive annealing (:mod:`poegen.clients.autoregressive`), one job per
  chunk of :data:`~poegen.expert_servers.digits.video.CHUNK` frames, the tie across each chunk
  boundary anchored to the previous chunk's last frame;
* ``joint``: all frames annealed in one job (the same factors);
* ``independent frames``: one job without the ties.

Each method's video is its best particle (poegen: the chain of each chunk's best). It writes
``out/demo_video.png`` (a contact sheet: a row of frames per method, the simulated centre
marked), ``out/demo_video.mp4`` (poegen's video) and ``out/demo_video.json``
(``{"metric", "higher_is_better", "poegen", "baselines", "evaluations"}``, the metric the
frame-to-frame appearance change, plus the label consistency judged by the held-out
classifier and the centroid error per method).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.clients.demo import DemoOptions, demo_settings, say, served_stack

STARTUP_TIMEOUT_S = 600.0  # generous: a busy machine imports torch slowly
SCALE = 3  # pixels per canvas pixel in the contact sheet
VIDEO_SCALE = 4  # and in the MP4
METHODS = ("poegen", "joint", "independent frames")
METRIC = "frame-to-frame appearance change"  # lower is better; the ties' whole point
KEYS = ("label_consistency", "centroid_error_px", "appearance_change")


def stack_mapping(asset_root: Path) -> dict[str, Any]:
    """The stack of ``examples/video/stack.yaml``, with the shipped models' own paths and the
    physics expert on ``asset_root``."""
    from poegen.expert_servers.digits import model_path, video

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = {"env": env, "startup_timeout_s": STARTUP_TIMEOUT_S}
    return {
        "experts": [
            {"name": "digit", "backend": "flow", "model": str(model_path("flow-cond"))} | common,
            {"name": "background", "backend": "analytic", "expert": "blank_canvas",
             "params": {"height": video.HEIGHT, "width": video.WIDTH,
                        "std": video.BACKGROUND_STD},
             "latent_space": "pixels-1"} | common,
            {"name": "tie", "backend": "analytic", "expert": "frame_tie",
             "params": {"size": video.BOX_SIZE, "weight": video.TIE_WEIGHT, "name": "tie"}}
            | common,
            {"name": "reward", "backend": "classifier",
             "model": str(model_path("classifier-reward"))} | common,
            {"name": "physics", "backend": "physics", "model": str(asset_root)} | common,
        ],
        "sampler": {"max_jobs": 2},
    }  # fmt: skip


def simulated_boxes(physics_address: str) -> tuple[Tensor, tuple[Any, ...]]:
    """The physics expert's Render of the scene (one Prepare, one Render) → (centres, boxes)."""
    from poegen.clients.spec import ConditionSpec
    from poegen.expert_servers.digits import video
    from poegen.kernel.remote import RemoteExpert

    condition = ConditionSpec(text=video.SCENE_FILE, scalars=video.scene_scalars()).to_proto()
    with RemoteExpert.connect(physics_address, condition=condition) as physics:
        render = physics.render(["positions", "intrinsics", "extrinsics"])
    centres = video.trajectory(render)
    return centres, video.boxes(centres)


class VideoJobs:
    """The jobs' specs: poegen's chunks (:meth:`chunk`), the joint run, the independent
    frames; tensor files (regions, references) are written under ``directory``."""

    def __init__(self, directory: Path, boxes: tuple[Any, ...], particles: int, steps: int,
                 seed: int = 0) -> None:  # fmt: skip
        from poegen.expert_servers.digits import video

        self.directory = directory
        self.boxes = boxes
        self.settings = video.settings(particles, steps)
        self.seed = seed

    def _region(self, start: int, stop: int) -> dict[str, str]:
        from poegen.clients.autoregressive import tensor_file
        from poegen.expert_servers.digits import video

        region = video.background_region(self.boxes[start:stop])
        return tensor_file(self.directory, f"region-{start}-{stop}", region)

    def chunk(self, chunk: Any, made: Tensor | None) -> dict[str, Any]:
        """Chunk ``chunk``'s spec given the frames ``made`` so far (``(f, H, W)`` or None)."""
        from poegen.clients.autoregressive import tensor_file
        from poegen.expert_servers.digits import video

        reference = None
        if made is not None:
            anchor = self.boxes[chunk.start - 1].of(made[-1])
            reference = tensor_file(self.directory, f"reference-{chunk.start}", anchor)
        return video.chunk_spec(
            self.boxes, chunk.start, chunk.stop, {"region": self._region(chunk.start, chunk.stop)},
            reference=reference, seed=self.seed + 1000 * chunk.index, sampler=self.settings,
        )  # fmt: skip

    def whole(self, particles: int, *, ties: bool) -> dict[str, Any]:
        """One job over every frame (the joint run, or without ties the independent frames)."""
        from poegen.expert_servers.digits import video

        frames = len(self.boxes)
        return video.chunk_spec(
            self.boxes, 0, frames, {"region": self._region(0, frames)}, ties=ties,
            seed=self.seed, sampler=self.settings.model_copy(update={"num_particles": particles}),
        )  # fmt: skip

    def particles_for(self, evaluations: int, *, ties: bool) -> int:
        """As many particles as ``evaluations`` buy for a job over every frame."""
        from poegen.bench import baselines

        frames = len(self.boxes)
        cost = baselines.cost_per_particle(
            self.settings, 2 * frames, frames, (frames - 1) if ties else 0
        )
        return max(1, evaluations // cost)


def evaluations(result: Any) -> int:
    return sum(s for event in result.trace for (_, _, s) in event.timings.values())


def run_methods(client: Any, jobs: VideoJobs, say: Any) -> dict[str, tuple[Tensor, int]]:
    """Each method's video and its evaluations, through ``client``."""
    from poegen.clients.autoregressive import generate_autoregressive
    from poegen.clients.spec import GenerationSpec
    from poegen.expert_servers.digits import video

    frames = len(jobs.boxes)
    t0 = time.perf_counter()

    def chunk_done(chunk: Any, result: Any) -> None:
        say(f"  poegen chunk {chunk.index} (frames {chunk.start}-{chunk.stop - 1}): "
            f"{result.particles.shape[0]} particles, {evaluations(result)} evaluations, "
            f"{time.perf_counter() - t0:.1f}s")  # fmt: skip

    made = generate_autoregressive(client, jobs.chunk, frames, video.CHUNK, on_chunk=chunk_done)
    out = {"poegen": (made.frames, made.evaluations)}
    for method, ties in (("joint", True), ("independent frames", False)):
        t0 = time.perf_counter()
        n = jobs.particles_for(made.evaluations, ties=ties)
        result = client.generate(GenerationSpec.from_mapping(jobs.whole(n, ties=ties)))
        out[method] = (result.particles[result.best_index], evaluations(result))
        say(f"  {method:<18} {n:4d} particles, {evaluations(result)} evaluations, "
            f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    return out


# --------------------------------------------------------------------------- outputs


def _frames_u8(frames: Tensor, scale: int) -> Tensor:
    """``(F, H·s, W·s)`` uint8 of grey frames in [-1, 1], each pixel an s×s block."""
    pixels = (((frames.float() + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def write_mp4(path: Path, frames: Tensor, fps: float) -> None:
    """Grey frames ``(F, H, W)`` in [-1, 1] as an H.264 MP4 (imageio's ffmpeg)."""
    import imageio.v2 as imageio

    big = _frames_u8(frames, VIDEO_SCALE).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(big), fps=fps, codec="libx264", macro_block_size=16)


def contact_sheet(path: Path, rows: list[tuple[str, Tensor]], centres: Tensor, title: str) -> None:
    """A row of frames per method, the simulated centre of each frame marked in red."""
    from PIL import Image, ImageDraw

    frames, height, width = rows[0][1].shape
    pad, line = 4, 16
    tile_w, tile_h = width * SCALE, height * SCALE
    sheet_w = frames * (tile_w + pad) + 8
    sheet = Image.new("RGB", (sheet_w, 24 + len(rows) * (tile_h + line + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 6), title, fill="black")
    y = 24
    for label, video in rows:
        draw.text((4, y), label, fill="black")
        for f, tile in enumerate(_frames_u8(video, SCALE)):
            x = 4 + f * (tile_w + pad)
            sheet.paste(Image.fromarray(tile.numpy()).convert("RGB"), (x, y + line))
            u, v = (float(c) * SCALE for c in centres[f])
            draw.ellipse((x + u - 2, y + line + v - 2, x + u + 2, y + line + v + 2), fill="red")
        y += tile_h + line + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def record(scores: dict[str, dict[str, float]], evals: dict[str, int]) -> dict[str, Any]:
    """``out/demo_video.json``: the main metric, the baselines', every metric per method."""
    for method, row in scores.items():
        if not all(math.isfinite(v) for v in row.values()):
            raise ValueError(f"{method}: a metric is not finite: {row}")
    return {
        "metric": METRIC, "higher_is_better": False,
        "poegen": scores["poegen"]["appearance_change"],
        "baselines": {m: s["appearance_change"] for m, s in scores.items() if m != "poegen"},
        "evaluations": evals["poegen"],
        "label_consistency": {m: s["label_consistency"] for m, s in scores.items()},
        "centroid_error_px": {m: s["centroid_error_px"] for m, s in scores.items()},
        "evaluations_per_method": dict(evals),
    }  # fmt: skip


def table(scores: dict[str, dict[str, float]], evals: dict[str, int]) -> str:
    lines = [f"{'method':<20} {'label cons.':>11} {'centroid px':>11} {'change':>7} {'evals':>7}"]
    for m, s in scores.items():
        lines.append(f"{m:<20} {s['label_consistency']:11.1%} {s['centroid_error_px']:11.2f} "
                     f"{s['appearance_change']:7.3f} {evals[m]:7d}")  # fmt: skip
    return "\n".join(lines)


def run(options: DemoOptions, *, start_stack: Any = None) -> int:
    """The video demo (see the module docstring)."""
    from poegen.clients.sdk import Client
    from poegen.expert_servers.digits import compose, video
    from poegen.expert_servers.digits.train import LABEL_NAMES

    # fewer levels than the benchmark's 12: the demo's budget is the stack's start
    particles, steps, out = demo_settings(options, particles=16, steps=8, out="out/demo_video.png")
    started = time.perf_counter()
    say(f"poegen demo --app video: a {LABEL_NAMES[video.LABEL]} along a MuJoCo trajectory, "
        f"{video.FRAMES} frames of {video.HEIGHT}x{video.WIDTH}, chunks of {video.CHUNK}")  # fmt: skip
    say("starting a local stack: 5 expert servers (class-conditional prior, background, "
        "temporal tie, reward classifier, physics) + the Sampler service ...")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="poegen-video-") as tmp:
        root = video.write_assets(Path(tmp) / "assets")
        with served_stack(stack_mapping(root), start_stack, started) as stack:
            centres, boxes = simulated_boxes(stack.endpoints.experts["physics"])
            say(f"  physics: {len(boxes)} frames simulated, the ball from "
                f"({centres[0, 0]:.1f}, {centres[0, 1]:.1f}) to "
                f"({centres[-1, 0]:.1f}, {centres[-1, 1]:.1f}) px")  # fmt: skip
            jobs = VideoJobs(Path(tmp) / "tensors", boxes, particles, steps)
            with Client.from_stack(stack, in_process=options.in_process) as client:
                videos = run_methods(client, jobs, say)
    judge = compose.load_judge()
    scores = {m: video.video_metrics(judge, v, boxes, centres) for m, (v, _) in videos.items()}
    evals = {m: e for m, (_, e) in videos.items()}
    contact_sheet(
        out, [(f"{m}  [appearance change {scores[m]['appearance_change']:.3f}; judge: "
               f"{scores[m]['label_consistency']:.0%} of frames a {video.LABEL}; centroid error "
               f"{scores[m]['centroid_error_px']:.2f} px]", v) for m, (v, _) in videos.items()],
        centres, f"video: a {LABEL_NAMES[video.LABEL]} thrown by MuJoCo, equal expert "
        f"evaluations ({evals['poegen']:,}); red: the simulated centre",
    )  # fmt: skip
    mp4 = out.with_suffix(".mp4")
    write_mp4(mp4, videos["poegen"][0], video.FPS)
    record_path = out.with_suffix(".json")
    record_path.write_text(json.dumps(record(scores, evals), indent=1, allow_nan=False) + "\n")
    say("")
    say(table(scores, evals))
    say(f"\nwrote {out.resolve()}, {mp4.name} and {record_path.name} in "
        f"{time.perf_counter() - started:.1f}s")  # fmt: skip
    return 0
