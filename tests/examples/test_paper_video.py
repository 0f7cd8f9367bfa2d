"""The paper's physics video recipe (``examples/paper/video``, ``docs/paper-video.md``) end to
end on tiny random-weight Wan folders: the recipe folder is copied, tiny VACE and I2V folders
are built at the model paths its stack names, the sizes shrink to what the tiny folders take
(9 frames of 32×32 → latents (16, 3, 4, 4)), and the page's commands run as processes, as
written: ``poegen generate --stack``, ``poegen up`` with the SDK script against it, one job and
the autoregressive chunks.

What the copy changes, and nothing else: the scene's size, length and frame rate, the spec's
sample shape, ``num_frames`` and particle and level counts, the first frame's size, and in the
stack the CUDA/bfloat16 options (float32 on the CPU here) and one thread per process."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.docs import docs_section
from helpers.stack import stack_processes, wait_gone
from helpers.timing import scaled

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "paper" / "video"
PAGE = "paper-video.md"
SIZE, FRAMES, FPS = 32, 9, 4  # the tiny Wan folders' clip; 4 fps: the ball leaves the table
LATENTS = (16, 3, 4, 4)
PARTICLES, STEPS, MOVES = 2, 3, 1  # num_steps T: T − 1 levels strictly inside (0, 1)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _stack(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "stack.yaml").read_text())


def _models(stack: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["model"] for e in stack["experts"] if e["backend"] == "wan"}


def _shrink(root: Path) -> None:
    """The recipe at the tiny folders' size, on the CPU (the module docstring's list)."""
    from PIL import Image

    scene = yaml.safe_load((root / "scene.yaml").read_text())
    scene.update(width=SIZE, height=SIZE, frames=FRAMES, fps=FPS)
    (root / "scene.yaml").write_text(yaml.safe_dump(scene))
    spec = yaml.safe_load((root / "spec.yaml").read_text())
    spec["sample_shape"] = list(LATENTS)
    spec["settings"].update(num_particles=PARTICLES, num_steps=STEPS, mcmc_steps=MOVES)
    (i2v,) = [e for e in spec["experts"] if e["name"] == "i2v"]
    i2v["condition"]["scalars"]["num_frames"] = FRAMES
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    stack = _stack(root)
    for expert in stack["experts"]:
        options = expert.get("options", {})
        options.pop("device", None), options.pop("torch_dtype", None)
        expert["startup_timeout_s"] = scaled(120)
    stack["env"]["OMP_NUM_THREADS"] = "1"  # four processes on two cores
    (root / "stack.yaml").write_text(yaml.safe_dump(stack))
    with Image.open(root / "first_frame.png") as image:
        image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(root / "first_frame.png")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe folder copied, its model folders tiny random Wan folders, its sizes shrunk."""
    from poegen.expert_servers.flow.tiny import build_wan_i2v, build_wan_vace

    root = tmp_path_factory.mktemp("paper") / "video"
    shutil.copytree(RECIPE, root, ignore=shutil.ignore_patterns("__pycache__"))
    models = _models(_stack(root))
    vace, i2v = root / models["vace"], root / models["i2v"]
    threads = torch.get_num_threads()
    try:
        build_wan_vace(vace)
        build_wan_i2v(i2v)
    finally:
        torch.set_num_threads(threads)
    # the real checkpoints share Wan 2.1's VAE; so do the tiny ones (random weights otherwise)
    shutil.rmtree(i2v / "vae")
    shutil.copytree(vace / "vae", i2v / "vae")
    _shrink(root)
    return root


def _argv(
    command: str, root: Path, out: Path, addresses: dict[str, str] | None = None
) -> list[str]:
    """A documented command on the copy: paths under ``root`` and ``out``, ``poegen`` and
    ``python`` this interpreter, the page's example addresses the ones ``poegen up`` printed."""
    command = command.replace("examples/paper/video", str(root)).replace("out/", f"{out}/")
    if addresses is not None:
        command = re.sub(r"--sampler \S+", f"--sampler {addresses['sampler']}", command)
        command = re.sub(r"--endpoint (\w+)=\S+",
                         lambda m: f"--endpoint {m.group(1)}={addresses[m.group(1)]}", command)  # fmt: skip
    argv = shlex.split(command)
    head = {"poegen": [sys.executable, "-m", "poegen.clients.cli"], "python": [sys.executable]}
    return head[argv[0]] + argv[1:]


def _run(argv: list[str], timeout_s: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV,
                          timeout=scaled(timeout_s), check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _frames(path: Path) -> list[Any]:
    import imageio.v2 as imageio

    return imageio.mimread(path)


def _evaluations(trace: dict[str, Any]) -> dict[str, int]:
    """Samples evaluated per factor over the job's levels (the trace's timings)."""
    counts: dict[str, int] = {}
    for level in trace["levels"]:
        for name, timing in level["timings"].items():
            counts[name] = counts.get(name, 0) + timing["samples"]
    return counts


def _check_job(out: Path) -> dict[str, Any]:
    """What every one-job run writes: an MP4 per particle, 9 frames of 32×32; the particles;
    a trace naming both Wan factors, their folders and the physics source; the cost the page
    states, N·((T − 1)·(1 + K) + 1) evaluations per expert."""
    for k in range(PARTICLES):
        frames = _frames(out / f"sample_{k:03d}.mp4")
        assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
    from safetensors.torch import load_file

    particles = load_file(str(out / "particles.safetensors"))["particles"]
    assert particles.shape == (PARTICLES, *LATENTS) and torch.isfinite(particles).all()
    assert not torch.equal(particles[0], particles[1])
    trace = json.loads((out / "trace.json").read_text())
    experts = {e["name"]: e["model_id"] for e in trace["experts"]}
    assert set(experts) == {"vace", "i2v"}
    assert "Wan2.1-VACE" in experts["vace"] and "Wan2.1-I2V" in experts["i2v"]
    assert [(s["name"], s["endpoint"]) for s in trace["spec"]["sources"]] == [("sim", "physics")]
    (vace,) = [e for e in trace["spec"]["experts"] if e["name"] == "vace"]
    assert vace["links"] == [{"tensor": "depth", "source": "sim", "output": "depth"}]
    assert len(trace["levels"]) == STEPS - 1
    # per level a transition and K moves, then the last velocity for x̂0 at the last level
    per_expert = PARTICLES * ((STEPS - 1) * (1 + MOVES) + 1)
    assert {k: v for k, v in _evaluations(trace).items() if k in experts} == {
        "vace": per_expert, "i2v": per_expert}, _evaluations(trace)  # fmt: skip
    return trace


def test_the_shipped_recipe_is_wan_480p_throughout() -> None:
    """Scene, sample shape, num_frames and first frame agree at 832×480, 33 frames; the
    stack's Wan folders lie under models/ (git-ignored) and the physics root is the recipe."""
    from PIL import Image

    scene = yaml.safe_load((RECIPE / "scene.yaml").read_text())
    spec = yaml.safe_load((RECIPE / "spec.yaml").read_text())
    frames, height, width = scene["frames"], scene["height"], scene["width"]
    assert (frames, height, width) == (33, 480, 832)
    assert spec["sample_shape"] == [16, (frames - 1) // 4 + 1, height // 8, width // 8]
    (i2v,) = [e for e in spec["experts"] if e["name"] == "i2v"]
    assert i2v["condition"]["scalars"]["num_frames"] == frames
    with Image.open(RECIPE / "first_frame.png") as image:
        assert image.size == (width, height)
    stack = _stack(RECIPE)
    assert sorted(_models(stack).values()) == ["models/Wan2.1-I2V-14B-480P",
                                               "models/Wan2.1-VACE-1.3B"]  # fmt: skip
    assert [e["model"] for e in stack["experts"] if e["backend"] == "physics"] == ["."]
    assert "*" in (RECIPE / "models" / ".gitignore").read_text().split()


def test_poegen_generate_with_its_own_stack_runs_the_recipe(recipe: Path, tmp_path: Path) -> None:
    """The page's "Run it" command as written: the stack's processes, the job, the outputs."""
    (command,) = docs_section("Run it", PAGE)
    _run(_argv(command, recipe, tmp_path), timeout_s=240)
    _check_job(tmp_path / "paper-video")


@pytest.fixture
def up(recipe: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The page's ``poegen up`` as a process: the addresses it prints; SIGINT stops it all."""
    commands = docs_section("The SDK script and the autoregressive path", PAGE)
    assert commands[0].startswith("poegen up ")
    stderr = tmp_path / "up.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(_argv(commands[0], recipe, tmp_path), env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=err, process_group=0)  # fmt: skip
    try:
        processes = stack_processes(proc, scaled(180), stderr)
        assert set(processes) == {"vace", "i2v", "physics", "sampler"}
        yield {name: address for name, (address, _) in processes.items()}
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
        assert proc.wait(timeout=scaled(60)) == 0, stderr.read_text()[-2000:]
        assert wait_gone([pid for _, pid in processes.values()], timeout=scaled(10)) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_sdk_script_runs_one_job_and_the_autoregressive_chunks(
    recipe: Path, tmp_path: Path, up: dict[str, str]
) -> None:
    """``generate.py`` against the running stack, as the page writes it: the one job gives
    what ``poegen generate`` gives; the autoregressive run makes 2 chunks of 5 frames whose
    join is the 9-frame video: chunk 1 starts from chunk 0's last decoded frame and takes the
    simulation's depth frames 4–8, and the video is each chunk's own decoding, joined."""
    from safetensors.torch import load_file

    from poegen.clients.spec import ConditionSpec
    from poegen.kernel.remote import RemoteExpert

    one, chunked = docs_section("The SDK script and the autoregressive path", PAGE)[1:]
    assert "--autoregressive" in chunked and "--autoregressive" not in one
    printed = _run(_argv(one, recipe, tmp_path, up), timeout_s=120)
    _check_job(tmp_path / "paper-video-sdk")
    assert str(tmp_path / "paper-video-sdk" / "trace.json") in printed.split()

    _run(_argv(chunked, recipe, tmp_path, up), timeout_s=180)
    out = tmp_path / "paper-video-ar"
    saved = load_file(str(out / "video.safetensors"))
    video = saved["video"]
    assert video.shape == (3, FRAMES, SIZE, SIZE) and video.abs().max() <= 1
    assert saved["latents"].shape == (16, 4, 4, 4)  # 2 chunks × 2 latent frames
    assert len(_frames(out / "video.mp4")) == FRAMES
    record = json.loads((out / "chunks.json").read_text())
    assert record["frames"] == FRAMES
    assert [c["latent_frames"] for c in record["chunks"]] == [2, 2]
    assert all(c["evaluations"] > 0 for c in record["chunks"])
    scene = ConditionSpec(text="scene.yaml").to_proto()
    with RemoteExpert.connect(up["physics"], condition=scene) as physics:
        depth = physics.render(["depth"])["depth"]  # (9, 1, 32, 32)
    with RemoteExpert.connect(up["i2v"]) as i2v:
        for k, chunk in enumerate(record["chunks"]):
            trace = json.loads((out / f"chunk_{k}" / "trace.json").read_text())
            assert trace["spec"]["sources"] == [] and trace["sample_shape"] == [16, 2, 4, 4]
            factors = {e["name"]: e for e in trace["spec"]["experts"]}
            assert set(factors) == {"vace", "i2v"}
            assert factors["i2v"]["condition"]["scalars"]["num_frames"] == 5
            given = factors["vace"]["condition"]["tensors"]["depth"]
            torch.testing.assert_close(
                load_file(given["file"])[given["key"]], depth[4 * k : 4 * k + 5], rtol=0, atol=0
            )
            latents = load_file(str(out / f"chunk_{k}" / "particles.safetensors"))["particles"]
            own = i2v.decode(latents[chunk["picked"]][None].float())[0]  # (3, 5, 32, 32)
            torch.testing.assert_close(video[:, 4 * k + 1 : 4 * k + 5], own[:, 1:])
            if k == 0:
                torch.testing.assert_close(video[:, :1], own[:, :1])
            else:  # its first frame: the last frame made before, as the I2V condition
                image = factors["i2v"]["condition"]["tensors"]["image"]
                handed = load_file(image["file"])[image["key"]]
                torch.testing.assert_close(handed, video[:, 4 * k], rtol=0, atol=0)
    # the metric of real runs (bench/paper_video.py) reads both kinds of output folder
    from poegen.bench.paper_video import measure

    for folder in ("paper-video-sdk", "paper-video-ar"):
        scores = measure(recipe, tmp_path / folder)
        assert 0 <= scores["foreground_iou"] <= 1 and 0 <= scores["simulation_iou"] <= 1
    assert measure(recipe, tmp_path / "paper-video-sdk")["videos"] == PARTICLES


def test_the_foreground_iou_tells_the_simulation_from_a_still_video(tmp_path: Path) -> None:
    """``bench/paper_video.py`` on the shipped scene (9 frames of 208×120): the simulation's
    own RGB, through H.264, scores near its ceiling; a still video (frame 0 repeated) scores
    nothing where the ball is."""
    from poegen.bench.paper_video import measure, simulate
    from poegen.clients.outputs import write_video

    render = simulate(RECIPE, 208, 120, 9)
    rgb = (render["rgb"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    (tmp_path / "sim").mkdir()
    write_video(tmp_path / "sim" / "sample_000.mp4", rgb, 16)
    (tmp_path / "still").mkdir()
    write_video(tmp_path / "still" / "video.mp4", rgb[:1].repeat(9, axis=0), 16)
    followed = measure(RECIPE, tmp_path / "sim")
    assert followed["videos"] == 1 and followed["simulation_iou"] > 0.7
    assert followed["foreground_iou"] > 0.7
    assert measure(RECIPE, tmp_path / "still")["foreground_iou"] < 0.05
