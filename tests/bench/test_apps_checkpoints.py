"""``python -m poegen.bench.apps_checkpoints`` as ``docs/paper-layout.md`` shows it, as a process.

The recipes are not rerun: their folders are copied and shrunk (``helpers.app_outputs``) and
each run's folder is written by ``write_outputs``, as ``poegen generate`` writes it: random
16×16 edits, the simulation's own video (and a still one), random 32×32 layout samples. The
judge is a tiny random Qwen2-VL (the reward's folder a tiny Qwen2.5-VL), the detector a tiny
random OWL-ViT, both built offline; the command's ``cuda:0`` and ``bfloat16`` become ``cpu`` and
``float32``. Figures of random models mean nothing: the test checks keys, ranges, the
provenance, the table and the refusals.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.app_outputs import copy_recipes, write_run
from helpers.detector_models import save_owlvit
from helpers.docs import REPO, docs_section
from helpers.timing import scaled
from helpers.vlm_models import save_qwen2_vl

from poegen.bench import apps_checkpoints, provenance

PAGE = "paper-layout.md"
SECTION = "Metrics on real checkpoints"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _documented() -> str:
    (command,) = docs_section(SECTION, PAGE)
    return command


def _argv(command: str) -> list[str]:
    """The page's command on CPU with this interpreter."""
    command = command.replace("cuda:0", "cpu").replace("bfloat16", "float32")
    words = shlex.split(command)
    assert words[0] == "python", command
    return [sys.executable, *words[1:]]


def _value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder the page's command runs in: the recipes, their runs, the models."""
    from poegen.bench.paper_video import simulate

    root = tmp_path_factory.mktemp("apps-checkpoints")
    paper = copy_recipes(root)
    words = shlex.split(_documented())
    g = torch.Generator().manual_seed(0)
    write_run(root / _value(words, "--editing"), paper / "editing/spec.yaml",
              torch.rand(2, 3, 16, 16, generator=g))  # fmt: skip
    rgb = simulate(paper / "video", 32, 32, 9)["rgb"]  # (F, 3, H, W): the simulation itself
    videos = torch.stack([rgb.transpose(0, 1), rgb[:1].expand(9, -1, -1, -1).transpose(0, 1)])
    write_run(root / _value(words, "--video"), paper / "video/spec.yaml", videos)
    write_run(root / _value(words, "--layout"), paper / "layout/spec.yaml",
              torch.rand(3, 3, 32, 32, generator=g))  # fmt: skip
    save_qwen2_vl(root / _value(words, "--judge"), version="2")
    # the reward's folder (stack.yaml's vqa model): a symlink, as the page suggests for weights
    save_qwen2_vl(root / "reward-qwen2.5-vl", version="2.5")
    (paper / "layout/models/Qwen2.5-VL-7B-Instruct").symlink_to(root / "reward-qwen2.5-vl")
    save_owlvit(root / _value(words, "--detector"))
    return root


def test_the_documented_command_measures_the_three_runs(root: Path) -> None:
    command = _documented()
    assert command.startswith("python -m poegen.bench.apps_checkpoints --editing ")
    done = subprocess.run(_argv(command), cwd=root, env=ENV, capture_output=True, text=True,
                          timeout=scaled(120), check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # the default --out, under the folder it ran in (here not the repository's bench/results)
    out = root / "bench/results/apps_checkpoints.json"
    assert f"-> {Path('bench/results/apps_checkpoints.json')}" in done.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"provenance", "runs", "metrics"}
    origin = data["provenance"]
    assert origin["commit"] == provenance._git("rev-parse", "HEAD")
    assert origin["measures"] == list(provenance.MEASURES["apps_checkpoints"])
    assert isinstance(origin["dirty"], bool)
    metrics = data["metrics"]
    assert set(metrics) == {"editing", "video", "layout"}
    editing = metrics["editing"]
    assert set(editing) == {
        "background_mse",
        "background_psnr",
        "foreground_ssim",
        "foreground_mse",
    }
    assert 0 < editing["background_mse"] <= 1 and editing["background_psnr"] > 0
    assert editing["background_psnr"] == pytest.approx(-10 * math.log10(editing["background_mse"]))
    assert -1 <= editing["foreground_ssim"] <= 1 and 0 <= editing["foreground_mse"] <= 1
    video = metrics["video"]
    assert set(video) == {"foreground_iou", "foreground_iou_min", "simulation_iou", "videos"}
    assert video["videos"] == 2
    # the simulation's own video and a still one: the minimum is the still one's
    assert 0 <= video["foreground_iou_min"] < video["foreground_iou"] <= 1
    layout = metrics["layout"]
    assert set(layout) == {"samples", "vqascore", "vqascore_log", "box_iou", "box_found",
                           "box_iou_apple", "box_iou_teacup"}  # fmt: skip
    assert layout["samples"] == 3
    assert 0 < layout["vqascore"] < 1 and layout["vqascore_log"] < 0
    assert math.log(layout["vqascore"]) >= layout["vqascore_log"] - 1e-12  # Jensen
    for key in ("box_iou", "box_found", "box_iou_apple", "box_iou_teacup"):
        assert 0 <= layout[key] <= 1, key
    assert layout["box_iou"] == pytest.approx(
        (layout["box_iou_apple"] + layout["box_iou_teacup"]) / 2
    )
    words = shlex.split(command)
    assert data["runs"]["layout"] == {
        "recipe": "examples/paper/layout",
        "outputs": _value(words, "--layout"),
        "judge": _value(words, "--judge"),
        "detector": _value(words, "--detector"),
    }
    # one table row per metric
    for app, figures in metrics.items():
        for name in figures:
            assert any(line.split()[:2] == [app, name] for line in done.stdout.splitlines()), name


def test_the_other_pages_point_at_the_command() -> None:
    for page, app in (("paper-editing.md", "editing"), ("paper-video.md", "video")):
        text = (REPO / "docs" / page).read_text()
        section = text.split(f"## {SECTION}\n")[1].split("\n## ")[0]
        assert "(paper-layout.md#metrics-on-real-checkpoints)" in section, page
        assert f"--{app} out/paper-{app}" in section and f"--{app} out/paper-{app}" in _documented()


def test_a_judge_that_is_the_reward_is_refused(root: Path, tmp_path: Path) -> None:
    """The reward's folder by its real path (the stack names it through a symlink): exit 2,
    the field named, nothing written."""
    words = shlex.split(_documented())
    out = tmp_path / "refused.json"
    argv = [sys.executable, "-m", "poegen.bench.apps_checkpoints", "--layout",
            _value(words, "--layout"), "--judge", str(root / "reward-qwen2.5-vl"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, cwd=root, env=ENV, capture_output=True, text=True,
                          timeout=scaled(60), check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: judge: " in done.stderr and "reward" in done.stderr
    assert not out.exists()


def test_bad_arguments_exit_2_naming_the_field(root: Path, tmp_path: Path, capsys) -> None:
    for argv, field in (
        ([], "--editing"),
        (["--video", "x", "--judge", "j"], "--layout"),
    ):
        with pytest.raises(SystemExit) as exited:
            apps_checkpoints.main(argv)
        assert exited.value.code == 2
        assert field in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = root / "examples/paper/layout"
    code = apps_checkpoints.main(["--layout", str(empty), "--layout-recipe", str(recipe),
                                  "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert code == 2 and "no sample_NNN.png" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
