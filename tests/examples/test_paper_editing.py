"""The paper's editing recipe (``examples/paper/editing``, ``docs/paper-editing.md``) end to end.

The recipe folder is copied into a working folder at the same relative path
(``examples/paper/editing``), tiny random-weight FLUX folders are built at its ``models/...``
paths (:func:`~poegen.expert_servers.flow.tiny.build_flux` with a depth control and
:func:`helpers.flow_models.build_flux_fill`: 16 × 16 pixels, latents 16 × 8 × 8), and its
background is scaled to their size (``sample_shape`` [16, 8, 8], the only line of the spec that
changes). Every ``sh`` command of the docs page then runs as written, as a process in that
folder: the mask render, ``poegen up``, ``poegen generate --stack`` and the SDK script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from helpers.docs import REPO, docs_section
from helpers.stack import stack_processes
from helpers.timing import scaled
from PIL import Image
from safetensors.torch import load_file

from poegen.clients.endpoints import health
from poegen.clients.spec import GenerationSpec, to_request

RECIPE = REPO / "examples" / "paper" / "editing"
HERE = Path("examples/paper/editing")  # the recipe's path in the docs' commands
PAGE = "paper-editing.md"
TINY = 16  # pixels: the tiny FLUX VAE's scale is 2, so 8 × 8 latents
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # four server processes and the client share the machine's cores: one thread each keeps
    # them from oversubscribing it (measured: 40 s of sampling with the default, 8 s with 1)
    "OMP_NUM_THREADS": "1",
}


def _argv(command: str) -> list[str]:
    """A documented command line as this interpreter runs it."""
    argv = shlex.split(command)
    if argv[0] == "poegen":
        return [sys.executable, "-m", "poegen.clients.cli", *argv[1:]]
    assert argv[0] == "python", command
    return [sys.executable, *argv[1:]]


def _run(command: str, cwd: Path, timeout_s: float) -> str:
    done = subprocess.run(
        _argv(command), cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=scaled(timeout_s), check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done.stdout


def _command(section: str, starts: str) -> str:
    (command,) = [c for c in docs_section(section, PAGE) if c.startswith(starts)]
    return command


def _edit_module(recipe: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_edit", recipe / "edit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working folder: ``examples/paper/editing`` in it is the recipe at tiny size."""
    from helpers.flow_models import build_flux, build_flux_fill

    root = tmp_path_factory.mktemp("paper-editing")
    recipe = root / HERE
    shutil.copytree(RECIPE, recipe, ignore=shutil.ignore_patterns("models", "__pycache__"))
    build_flux(recipe / "models" / "FLUX.1-Depth-dev", control=True)
    build_flux_fill(recipe / "models" / "FLUX.1-Fill-dev")
    background = Image.open(recipe / "background.png")
    background.resize((TINY, TINY), Image.Resampling.BOX).save(recipe / "background.png")
    spec = recipe / "spec.yaml"
    text, n = re.subn(r"^sample_shape: \[16, 64, 64\]", "sample_shape: [16, 8, 8]",
                      spec.read_text(), flags=re.M)  # fmt: skip
    assert n == 1
    spec.write_text(text)
    # the page's own step: the depth factor's region re-rendered at the new size
    _run(_command("Pointing the stack at real weights", "python"), root, 120)
    return root


@pytest.fixture(scope="module")
def generated(work: Path) -> Path:
    """The page's ``poegen generate --stack`` (its own stack: four processes), its output."""
    command = _command("Run it", "poegen generate")
    _run(command, work, 300)  # measured: 26 s on 2 busy cores, start-up included
    return work / shlex.split(command)[shlex.split(command).index("-o") + 1]


@pytest.fixture(scope="module")
def sdk(work: Path) -> Path:
    """The page's SDK script (``LocalStack``, ``Client.stream``), its output folder."""
    command = _command("Run it", "python")
    _run(command, work, 300)
    return work / shlex.split(command)[-1]


def test_the_page_shows_the_recipe_files() -> None:
    text = (REPO / "docs" / PAGE).read_text()
    section = text.split("## Stack and spec\n")[1].split("\n## ")[0]
    stack, spec = (yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S))
    assert stack == yaml.safe_load((RECIPE / "stack.yaml").read_text())
    ours = yaml.safe_load((RECIPE / "spec.yaml").read_text())
    # the file comments its placement inside the YAML text: compare the placements parsed
    for s in (spec, ours):
        s["sources"][0]["condition"]["text"] = yaml.safe_load(s["sources"][0]["condition"]["text"])
    assert spec == ours


def test_the_committed_mask_is_the_silhouette_the_render_links() -> None:
    rendered = _edit_module(RECIPE).render(RECIPE)
    mask = torch.from_numpy(np.asarray(Image.open(RECIPE / "mask.png"), dtype=np.float32) / 255)
    background = Image.open(RECIPE / "background.png")
    assert rendered["mask"].shape == rendered["depth"].shape == (1, 1, *background.size[::-1])
    assert torch.equal(rendered["mask"][0, 0], mask)
    assert 0.05 < float(mask.mean()) < 0.5  # the crate: neither nothing nor the whole picture
    inside = rendered["depth"][0, 0][mask > 0]
    assert float(inside.min()) >= 0 and float(inside.max()) == 1.0  # near = 1 on the object


def test_fill_is_a_conditional_expert_of_depth_on_the_wire() -> None:
    spec = GenerationSpec.from_file(RECIPE / "spec.yaml")
    endpoints = {"depth": "127.0.0.1:1", "fill": "127.0.0.1:2", "graphics": "127.0.0.1:3"}
    request = to_request(spec, spec.sample_shape, endpoints)
    depth, fill = request.factors
    assert dict(fill.parents) == {"depth": 0.5} and not depth.parents
    assert [(lk.tensor, lk.source, lk.output) for lk in depth.links] == [
        ("depth", "render", "depth")
    ]
    assert [(lk.tensor, lk.source, lk.output) for lk in fill.links] == [("mask", "render", "mask")]
    assert set(fill.condition.tensors) == {"image"}  # the background; the mask comes by the link


def test_poegen_up_serves_the_three_experts_and_the_sampler(work: Path) -> None:
    up = subprocess.Popen(
        _argv(_command("Run it", "poegen up")), cwd=work, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, process_group=0,
    )  # fmt: skip
    try:
        served = {name: address for name, (address, _) in stack_processes(up, scaled(180)).items()}
        assert set(served) == {"depth", "fill", "graphics", "sampler"}, served
        assert all(health(address) == "SERVING" for address in served.values())
        os.killpg(up.pid, signal.SIGINT)  # the terminal's Ctrl-C
        assert up.wait(timeout=scaled(60)) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_generate_decodes_the_edits_and_pays_one_vjp_per_fill_velocity(
    work: Path, generated: Path
) -> None:
    spec = yaml.safe_load((work / HERE / "spec.yaml").read_text())
    settings, kept = spec["settings"], spec["output"]["samples"]
    n, levels, moves = settings["num_particles"], settings["num_steps"] - 1, settings["mcmc_steps"]
    for k in range(kept):
        image = Image.open(generated / f"sample_{k:03d}.png")
        assert image.size == (TINY, TINY) and image.mode == "RGB"  # 8 × 8 latents, VAE × 2
    assert (generated / "contact_sheet.png").is_file()
    particles = load_file(str(generated / "particles.safetensors"))["particles"]
    assert particles.shape == (n, 16, 8, 8) and torch.isfinite(particles).all()
    trace = json.loads((generated / "trace.json").read_text())
    assert len(trace["levels"]) == levels
    assert {e["name"] for e in trace["experts"]} == {"depth", "fill"}

    def total(expert: str, key: str) -> int:
        return sum(level["timings"][expert][key] for level in trace["levels"])

    # the page's cost: N·(1 + (T − 1)·(1 + M)) velocities per expert, as many VJPs for fill
    velocities = n * (1 + levels * (1 + moves))
    assert total("depth", "samples") == velocities and total("depth", "vjp_samples") == 0
    assert total("fill", "vjp_samples") == velocities > 0
    assert total("fill", "samples") == 2 * velocities  # samples count its VJPs' too
    for level in trace["levels"]:  # one VJP per velocity, at every level
        fill = level["timings"]["fill"]
        assert fill["vjp_samples"] > 0 and 2 * fill["vjp_samples"] == fill["samples"]


def test_the_sdk_script_keeps_the_background_outside_the_mask(
    work: Path, generated: Path, sdk: Path
) -> None:
    recipe = work / HERE
    background = _pixels(recipe / "background.png")
    inside = np.asarray(Image.open(recipe / "mask.png")) >= 128
    assert 0 < inside.sum() < inside.size
    for k in range(yaml.safe_load((recipe / "spec.yaml").read_text())["output"]["samples"]):
        sample, edit = _pixels(sdk / f"sample_{k:03d}.png"), _pixels(sdk / f"edit_{k:03d}.png")
        # copied pixels: equal, no tolerance; inside, the decoded sample unchanged
        assert np.array_equal(edit[~inside], background[~inside])
        assert np.array_equal(edit[inside], sample[inside])
        # with random weights the raw decode does not keep the background (Fill is untrained):
        # the composite, not the sampler, makes it exact here
        assert not np.array_equal(sample[~inside], background[~inside])
    # the same spec and seed through the SDK and the CLI, each on a fresh stack: the same job
    ours = load_file(str(sdk / "particles.safetensors"))
    theirs = load_file(str(generated / "particles.safetensors"))
    assert torch.equal(ours["particles"], theirs["particles"])


def test_the_bench_measures_the_run_it_reads(work: Path, sdk: Path) -> None:
    from poegen.bench.paper_editing import measure

    recipe = work / HERE
    figures = measure(recipe, sdk)
    assert figures["edit_background_psnr"] == float("inf")  # the composites: copied pixels
    # the raw MSE, recomputed here by hand from the files
    keep = np.asarray(Image.open(recipe / "mask.png")) < 128
    background = _pixels(recipe / "background.png")[keep] / 255
    samples = [_pixels(p)[keep] / 255 for p in sorted(sdk.glob("sample_*.png"))]
    expected = float(np.mean([(s - background) ** 2 for s in samples]))
    assert figures["background_mse"] == pytest.approx(expected, rel=1e-9)
    assert figures["background_psnr"] == pytest.approx(-10 * np.log10(expected), rel=1e-6)
    assert -1 <= figures["foreground_ssim"] <= 1 and 0 <= figures["foreground_mse"] <= 1
