"""The paper's layout recipe (examples/paper/layout, docs/paper-layout.md) end to end.

The recipe's folder is copied to ``tmp_path/examples/paper/layout`` and its ``models/`` folders
are filled with tiny random-weight models built here (``build_flux``: a FluxPipeline;
``save_qwen2_vl``: a Qwen2.5-VL), then the page's commands run as processes from ``tmp_path``,
as written, with ``python`` and ``poegen`` this environment's. :func:`shrink` is the one
difference, for a CPU and a tiny model: the latent grid and every box divided by 8
(16×128×128 → 16×16×16, 32×32 pixels), the GPU options made CPU float32 ones, 64 T5 tokens
instead of FLUX's 512, and port 0 for every process (the documented fixed ports are mapped to
the ones ``poegen up`` prints).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.app_outputs import shrink_layout_grid
from helpers.docs import REPO, docs_section
from helpers.stack import stack_processes
from helpers.timing import scaled
from PIL import Image
from safetensors.torch import load_file

from poegen.clients.spec import GenerationSpec
from poegen.clients.stack import LocalStack

RECIPE = REPO / "examples" / "paper" / "layout"
PAGE = "paper-layout.md"
SCALE = 8  # 128 latent cells → 16: FLUX packs 2×2, so every box stays a multiple of 2
BOX_FACTORS = ("apple", "teacup")
FACTORS = ("scene", *BOX_FACTORS, "vqascore")


def shrink(folder: Path) -> None:
    """The recipe at 1/8 of its latent grid, on CPU in float32, every port picked at start."""
    shrink_layout_grid(folder, SCALE)
    for name in ("stack.yaml", "stack.vllm.yaml"):
        stack = yaml.safe_load((folder / name).read_text())
        for expert in stack["experts"]:
            expert["port"] = 0
            options = expert.get("options", {})
            if "device" in options:
                options["device"] = "cpu"
            for key in ("torch_dtype", "dtype"):
                if key in options:
                    options[key] = "float32"
            if expert["backend"] == "flux":  # 64 T5 tokens, not 512: the tiny model's speed
                options["max_sequence_length"] = "64"
        stack["sampler"]["port"] = 0
        stack["env"]["OMP_NUM_THREADS"] = "1"  # three processes on two cores
        (folder / name).write_text(yaml.safe_dump(stack, sort_keys=False))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``examples/paper/layout`` (shrunk, tiny models in ``models/``)."""
    from helpers.vlm_models import save_qwen2_vl

    from poegen.expert_servers.flow.tiny import build_flux

    root = tmp_path_factory.mktemp("paper-layout")
    folder = root / "examples" / "paper" / "layout"
    shutil.copytree(RECIPE, folder, ignore=shutil.ignore_patterns("models", "__pycache__"))
    build_flux(folder / "models" / "FLUX.1-dev")
    save_qwen2_vl(folder / "models" / "Qwen2.5-VL-7B-Instruct", version="2.5")
    shrink(folder)
    return root


def _argv(command: str, addresses: dict[str, str]) -> list[str]:
    """A documented command as argv: this environment's python and poegen, the documented
    fixed addresses replaced by the ones the stack got."""
    for documented, actual in addresses.items():
        command = command.replace(documented, actual)
    words = command.split()
    if words[0] == "poegen":
        return [sys.executable, "-m", "poegen.clients.cli", *words[1:]]
    assert words[0] == "python", command
    return [sys.executable, *words[1:]]


def _run(argv: list[str], cwd: Path, timeout_s: float) -> str:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=scaled(timeout_s), check=False
    )
    assert done.returncode == 0, f"{argv}\n{done.stderr[-3000:]}"
    return done.stdout


def _check_run(out: Path, particles: int, spec: GenerationSpec) -> dict:
    """What one run wrote: ``particles`` particles of the tiny latent shape, PNGs of 32×32
    decoded pixels best first, and a trace with every factor's calls at every level."""
    import json

    shape = (16, 16, 16)
    saved = load_file(out / "particles.safetensors")
    assert saved["particles"].shape == (particles, *shape)
    assert torch.isfinite(saved["particles"]).all()
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == min(particles, spec.output.samples)
    assert all(Image.open(p).size == (32, 32) for p in pngs)  # 16 latent cells × the VAE's 2
    assert (out / "contact_sheet.png").is_file()
    trace = json.loads((out / "trace.json").read_text())
    assert trace["num_particles"] == particles
    assert {e["name"] for e in trace["experts"]} == set(FACTORS)
    levels = trace["levels"]
    assert len(levels) == spec.total_levels()
    moves = spec.settings.resolved().mcmc_steps
    for level in levels:
        timings = level["timings"]
        # each generative factor: its velocity after the transition and at every move, and
        # once more at the first level (the initial noise)
        velocities = (1 + moves + (level["step"] == 0)) * particles
        for name in BOX_FACTORS:
            assert timings[name]["samples"] == velocities, (name, level)
        # the paper preset weighs after the moves only: one VLM call per particle per level,
        # on the decoded x̂0, whose decode the scene factor (the decoder) adds to its own
        assert timings["vqascore"]["samples"] == particles, level
        assert timings["scene"]["samples"] == velocities + particles, level
    assert all(level["resampled"] for level in levels)  # the paper's every-level resampling
    return trace


def test_the_recipe_files_are_consistent_at_full_resolution() -> None:
    """As shipped (1024×1024): each box tensor is its factor's region, the scene's mask is 1
    exactly where no box is, the page shows the spec file, and both stacks load."""
    spec = GenerationSpec.from_file(RECIPE / "spec.yaml")
    assert spec.sample_shape == [16, 128, 128]
    experts = {e.name: e for e in spec.experts}
    assert list(experts) == list(FACTORS)
    covered = torch.zeros(128, 128)
    for name in BOX_FACTORS:
        top, left, height, width = experts[name].condition.tensors["box"].load().int().tolist()
        assert experts[name].region.box == [(top, top + height), (left, left + width)]
        covered[top : top + height, left : left + width] += 1
    assert covered.max() == 1  # the boxes do not overlap
    mask = experts["scene"].region.to_tensor(spec.sample_shape)
    assert torch.equal(mask, (1 - covered).expand(16, 128, 128))
    prompt = experts["scene"].condition.text
    assert experts["vqascore"].condition.text == prompt  # VQAScore on the full prompt
    assert spec.settings.preset_name == "paper"
    page = (REPO / "docs" / PAGE).read_text()
    shown = re.search(r"```yaml\n(# examples/paper/layout/spec.yaml\n.*?)```", page, re.S)
    assert shown, "docs/paper-layout.md shows the spec"
    assert yaml.safe_load(shown.group(1)) == yaml.safe_load((RECIPE / "spec.yaml").read_text())
    for name in ("stack.yaml", "stack.vllm.yaml"):
        config = LocalStack.from_yaml(RECIPE / name).config
        assert [e.name for e in config.experts] == ["flux", "vqa"]


def test_the_presets_run_on_one_stack_with_poegen_up_and_the_sdk(workdir: Path) -> None:
    """The page's "Particle presets" section as written: ``poegen up`` in the background, the
    three ``poegen generate --particles L`` and the SDK script against it; then Ctrl-C."""
    commands = docs_section("Particle presets: L = 1, 8, 32", PAGE)
    up_command, *runs = commands
    assert up_command == "poegen up examples/paper/layout/stack.yaml"
    assert len(runs) == 4
    documented = yaml.safe_load((RECIPE / "stack.yaml").read_text())
    ports = {e["name"]: e["port"] for e in documented["experts"]}
    ports["sampler"] = documented["sampler"]["port"]
    stderr = workdir / "up.stderr"
    with stderr.open("w") as err:
        up = subprocess.Popen(
            _argv(up_command, {}),
            cwd=workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            process_group=0,  # as a shell job: the Ctrl-C below reaches this group only
        )
    try:
        # three servers import torch at once, two of them diffusers/transformers too
        actual = {name: address for name, (address, _) in
                  stack_processes(up, scaled(180), stderr).items()}  # fmt: skip
        assert set(actual) == set(ports)
        addresses = {f"127.0.0.1:{ports[name]}": actual[name] for name in ports}
        spec = GenerationSpec.from_file(workdir / "examples/paper/layout/spec.yaml")
        for particles, command in zip((1, 8, 32), runs[:3], strict=True):
            assert f"--particles {particles} " in command, command
            _run(_argv(command, addresses), workdir, timeout_s=120)
            trace = _check_run(workdir / f"out/paper-layout/L{particles}", particles, spec)
            # the VLM's scores of the decoded x̂0 tell the particles apart at every level
            # (the weights before that level's resampling; after it they are equal again)
            spreads = [level["log_weight_spread"] for level in trace["levels"]]
            assert all(s > 0 for s in spreads) if particles > 1 else not any(spreads)
        sdk = runs[3]
        assert sdk.startswith("python examples/paper/layout/generate.py --particles 1 8 32 ")
        printed = _run(_argv(sdk, addresses), workdir, timeout_s=180)
        for particles in (1, 8, 32):
            assert f"L={particles}: {particles} particles" in printed, printed
            out = workdir / f"out/paper-layout/sdk/L{particles}"
            _check_run(out, particles, spec)
            # the same job through the SDK: the CLI's particles bit for bit (the flux server
            # answers one call at a time: ServedModel.concurrent; before, this job on one
            # stack did not always reproduce)
            cli = load_file(workdir / f"out/paper-layout/L{particles}/particles.safetensors")
            sdk_particles = load_file(out / "particles.safetensors")
            assert torch.equal(sdk_particles["particles"], cli["particles"])
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # the terminal's Ctrl-C
        try:
            code = up.wait(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
            raise
    assert code == 0, stderr.read_text()[-2000:]


def test_the_documented_generate_command_brings_up_its_own_stack(workdir: Path) -> None:
    """The page's "Run it" command as written: ``poegen generate … --stack …`` at L = 8."""
    (command,) = docs_section("Run it", PAGE)
    assert "--stack examples/paper/layout/stack.yaml" in command
    _run(_argv(command, {}), workdir, timeout_s=240)
    spec = GenerationSpec.from_file(workdir / "examples/paper/layout/spec.yaml")
    _check_run(workdir / "out/paper-layout/L8", 8, spec)
