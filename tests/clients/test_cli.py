"""The ``poegen`` CLI end to end: a subprocess stack (analytic and tiny diffusers flow experts
served with ``poegen serve BACKEND --model``), and the commands as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers.remote import free_port
from helpers.stack import ADMIN_TOKEN, MIX, REPO, SETTINGS, poegen, write_models
from helpers.timing import scaled

from poegen.clients.cli import main
from poegen.clients.stack import LocalStack
from poegen.expert_servers.flow.tiny import build_unet, flux_vae

COMMANDS = ("serve", "sampler", "up", "generate", "swap", "health", "describe", "schema", "demo")


def build_latent_flow(path: Path) -> Path:
    """A latent flow model: a UNet on 16-channel latents beside a tiny AutoencoderKL."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8, in_channels=16, out_channels=16, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).save_pretrained(path / "unet")  # fmt: skip
    flux_vae().save_pretrained(path / "vae")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("cli")
    models = root / "models"
    write_models(models)
    flows = root / "flows"
    pixel, latent = build_unet(flows / "pixel"), build_latent_flow(flows / "latent")
    data = {
        "experts": [
            {
                "name": "mix",
                "expert": "gaussian_mixture",
                "params": MIX,
                "model_root": str(models),
                "env": {"POEGEN_ADMIN_TOKEN": ADMIN_TOKEN},
            },
            {"name": "pixel", "backend": "flow", "model": str(pixel)},
            {"name": "latent", "backend": "flow", "model": str(latent)},
        ],
        "sampler": {"max_jobs": 2},
        "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    }
    with LocalStack.from_mapping(data) as running:
        yield running


def _spec_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- no servers


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    assert "Example" in capsys.readouterr().out


def test_unknown_backend_is_a_usage_error_listing_the_installed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "no-such-backend"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'no-such-backend'" in err
    assert re.search(r"installed: .*analytic.*flow", err)


def test_serve_rejects_bad_flags_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "analytic", "--option", "no-equals-sign"]) == 2
    assert "--option: expected key=value" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_text("expert: gaussian_mixture\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    args = ["serve", "analytic", "--model", str(tmp_path / "m.yaml"), "--model-root", str(other)]
    assert main(args) == 2
    assert "is not inside --model-root" in capsys.readouterr().err


def test_serve_exits_1_when_an_analytic_model_fails_to_load(tmp_path: Path) -> None:
    """The fast form of the test below: the same ``serve_model`` path (listen, announce, load
    through LoadModel, status 1) with a model file the analytic backend cannot build, so the
    process imports no diffusers (about 2 s)."""
    model = tmp_path / "broken.yaml"
    model.write_text("expert: no_such_expert\n")
    done = poegen(
        "serve", "analytic", "--model", str(model), "--port", "0", timeout=scaled(60)
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert re.match(r"poegen: serving analytic on 127\.0\.0\.1:\d+$", done.stdout.splitlines()[0])
    assert "poegen serve: error: loading 'broken.yaml' failed" in done.stderr
    assert "cannot build 'no_such_expert'" in done.stderr


@pytest.mark.slow  # imports diffusers in a fresh process (~10 s of CPU)
def test_serve_exits_1_when_the_model_fails_to_load(tmp_path: Path) -> None:
    """The host listens (the line is printed), the load through LoadModel fails, status 1."""
    done = poegen(
        "serve", "flow", "--model", "no-org/no-such-model", "--port", "0",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert re.match(r"poegen: serving flow on 127\.0\.0\.1:\d+$", done.stdout.splitlines()[0])
    assert "poegen serve: error: loading 'no-org/no-such-model' failed" in done.stderr


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--no-such-flag", "x:1"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_a_bad_spec_names_the_path_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec_file(
        tmp_path,
        {
            "experts": [
                {"address": "127.0.0.1:1"},
                {"address": "127.0.0.1:2"},
                {"address": "127.0.0.1:3", "region": {"box": [[4, 2]]}},
            ]
        },
    )
    assert main(["generate", str(spec), "--sampler", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poegen: error: ")
    assert f"{spec}: experts[2].region.box:" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--debug", "generate", str(spec), "--sampler", "127.0.0.1:1"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_unknown_endpoint_name_names_the_spec_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["generate", "examples/t1.yaml", "--sampler", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "poegen: error: examples/t1.yaml: experts[0].endpoint: no endpoint 'ring'" in err


def test_an_unreachable_sampler_fails_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec_file(
        tmp_path, {"sample_shape": [2], "settings": SETTINGS, "experts": [{"address": "a:1"}]}
    )
    assert main(["generate", str(spec), "--sampler", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("poegen: error:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "Traceback" not in err


def test_schema_matches_the_committed_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"experts", "settings", "output", "sources"} <= set(schema["properties"])
    committed = json.loads((REPO / "docs" / "spec.schema.json").read_text())
    assert committed == schema, "regenerate with: poegen schema -o docs/spec.schema.json"


# --------------------------------------------------------------------------- the stack


def test_generate_writes_outputs_as_a_process(stack: LocalStack, tmp_path: Path) -> None:
    endpoints = stack.endpoints
    spec = _spec_file(tmp_path, {"seed": 1, "settings": SETTINGS, "experts": [{"endpoint": "mix"}]})
    out = tmp_path / "out"
    done = poegen(
        "generate", str(spec), "--sampler", endpoints.sampler,
        "--endpoint", f"mix={endpoints.experts['mix']}", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {Path(p).name for p in done.stdout.split()} == {
        "particles.png", "particles.safetensors", "trace.json"
    }  # fmt: skip
    trace = json.loads((out / "trace.json").read_text())
    assert [level["step"] for level in trace["levels"]] == list(range(len(trace["levels"])))
    assert trace["num_particles"] == 32 and trace["experts"][0]["name"] == "mix"
    assert "level" in done.stderr and "ESS" in done.stderr  # the progress bar


def test_generate_decodes_latents_with_the_experts_autoencoder(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec_file(
        tmp_path,
        {
            "sample_shape": [16, 8, 8],
            "settings": {"num_particles": 4, "num_steps": 3, "mcmc_steps": 0, "schedule": "expert"},
            "experts": [{"endpoint": "latent"}],
            "output": {"samples": 3},
        },
    )
    endpoints = stack.endpoints
    args = ["generate", str(spec), "--sampler", endpoints.sampler, "-o", str(tmp_path / "o")]
    args += ["--endpoint", f"latent={endpoints.experts['latent']}"]
    assert main(args) == 0, capsys.readouterr().err
    from PIL import Image

    for k in range(3):
        with Image.open(tmp_path / "o" / f"sample_{k:03d}.png") as image:
            assert (image.mode, image.size) == ("RGB", (16, 16))  # the VAE upsamples 8 → 16
    with Image.open(tmp_path / "o" / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * 96  # 3 samples: a 2 × 2 grid
    trace = json.loads((tmp_path / "o" / "trace.json").read_text())
    steps = [level["step"] for level in trace["levels"]]
    assert steps and steps == list(range(len(steps)))  # the expert's own grid (Schedule)


def test_generate_maps_pixel_samples_to_images(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoints = stack.endpoints
    spec = _spec_file(
        tmp_path,
        {
            "sample_shape": [1, 16, 16],
            "settings": {"num_particles": 3, "num_steps": 3, "mcmc_steps": 0},
            "experts": [{"address": endpoints.experts["pixel"]}],
            "output": {"samples": 0},
        },
    )
    out = tmp_path / "o"
    assert main(["generate", str(spec), "--sampler", endpoints.sampler, "-o", str(out)]) == 0
    from PIL import Image

    assert sorted(p.name for p in out.glob("sample_*.png")) == [
        "sample_000.png", "sample_001.png", "sample_002.png"
    ]  # fmt: skip
    with Image.open(out / "sample_000.png") as image:
        assert image.size == (16, 16)


def test_health_and_describe(stack: LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    endpoints = stack.endpoints
    addresses = [*endpoints.experts.values(), endpoints.sampler]
    assert main(["health", *addresses]) == 0
    out = capsys.readouterr().out
    assert out.count("SERVING") == 4
    assert main(["health", endpoints.sampler, f"127.0.0.1:{free_port()}"]) == 1
    assert "UNREACHABLE" in capsys.readouterr().out
    assert main(["describe", endpoints.experts["latent"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_id"] == "latent" and info["kind"] == "generative"
    assert {"autoencoder", "schedule"} <= set(info["capabilities"])
    assert main(["describe", endpoints.experts["mix"]]) == 0
    out = capsys.readouterr().out
    assert re.search(r"name\s+mix", out) and re.search(r"model_id\s+analytic", out)


def test_swap_shows_progress_and_needs_the_admin_token(
    stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = stack.endpoints.experts["mix"]
    monkeypatch.delenv("POEGEN_ADMIN_TOKEN", raising=False)
    assert main(["swap", address, "--model", "shifted.yaml"]) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("poegen: error:")]
    assert len(errors) == 1 and "PERMISSION_DENIED" in errors[0] and "admin token" in errors[0]
    monkeypatch.setenv("POEGEN_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["swap", address, "--model", "../escape.yaml"]) == 1
    assert "model_id" in capsys.readouterr().err
    assert main(["swap", address, "--model", "shifted.yaml"]) == 0
    captured = capsys.readouterr()
    revision = re.search(r"serving shifted.yaml \(revision (\S+)\)", captured.out)
    assert revision and "ready" in captured.err
    assert main(["describe", address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_id"], info["revision"]) == ("shifted.yaml", revision.group(1))


# --------------------------------------------------------------------------- a stack per run


def test_generate_with_its_own_stack_from_the_examples(tmp_path: Path) -> None:
    """The README's example: bring up examples/t1_stack.yaml for one run of examples/t1.yaml."""
    out = tmp_path / "t1"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "poegen"),  # the console script
            "generate", "examples/t1.yaml", "--stack", "examples/t1_stack.yaml",
            "--particles", "64", "--steps", "10", "-o", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=scaled(240),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trace = json.loads((out / "trace.json").read_text())
    assert [e["name"] for e in trace["experts"]] == ["ring", "bar"]
    assert trace["num_particles"] == 64
    assert (out / "particles.png").stat().st_size > 1000


def test_log_json_writes_one_json_object_per_line():
    """``poegen --log-json``: every log line on stderr parses as JSON with its fields, a logged
    exception included."""
    program = (
        "import logging\n"
        "from poegen.clients.cli import main\n"
        "main(['--log-json', '--log-level', 'INFO', 'health', '127.0.0.1:1', '--timeout', '0.5'])\n"
        "logging.getLogger('poegen.test').info('hello %s', 'there')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('poegen.test').exception('failed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=scaled(60)
    )
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    mine = [e for e in entries if e["logger"] == "poegen.test"]
    assert [e["message"] for e in mine] == ["hello there", "failed"]
    assert mine[0]["level"] == "INFO" and mine[0]["time"].endswith("+00:00")
    assert "ZeroDivisionError" in mine[1]["exception"]


def _yaml_blocks(page: str, title: str) -> list[str]:
    """The ```yaml blocks under ``## title`` of ``docs/<page>``."""
    text = (REPO / "docs" / page).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/{page} has no section {title!r}"
    return re.findall(r"```yaml\n(.*?)```", match.group(1), re.S)


def test_the_stack_file_of_docs_cli_comes_up_as_written(tmp_path: Path) -> None:
    """docs/cli.md's stack block, written to a file beside what it names (a copy of
    examples/experts/ring.yaml, a tiny random-weight FLUX folder): every process serves, and
    the flux expert takes the options the page gives."""
    from poegen.expert_servers.flow.tiny import build_flux

    (block,) = _yaml_blocks("cli.md", "Stack files (`poegen up`, `--stack`, `LocalStack`)")
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "ring.yaml").write_text(
        (REPO / "examples" / "experts" / "ring.yaml").read_text()
    )
    build_flux(tmp_path / "models" / "flux")
    (tmp_path / "stack.yaml").write_text(block)
    with LocalStack.from_yaml(tmp_path / "stack.yaml") as running:
        endpoints = running.endpoints
        assert set(endpoints.experts) == {"ring", "bar", "flux"}
        done = poegen("health", *endpoints.experts.values(), endpoints.sampler)
        assert done.returncode == 0 and done.stdout.count("SERVING") == 4, done.stdout
        assert main(["describe", endpoints.experts["flux"], "--json"]) == 0


def test_the_spec_file_of_docs_cli_is_the_editing_recipes(tmp_path: Path) -> None:
    """docs/cli.md's spec block is examples/paper/editing/spec.yaml (which
    tests/examples/test_paper_editing.py runs end to end), and loads as a spec there."""
    from poegen.clients.spec import GenerationSpec

    (block,) = _yaml_blocks("cli.md", "Spec files (`poegen generate`, `GenerationSpec`)")
    recipe = REPO / "examples" / "paper" / "editing" / "spec.yaml"
    assert yaml.safe_load(block) == yaml.safe_load(recipe.read_text())
    copy = tmp_path / "editing"
    shutil.copytree(recipe.parent, copy, ignore=shutil.ignore_patterns("models"))
    (copy / "spec.yaml").write_text(block)
    spec = GenerationSpec.from_file(copy / "spec.yaml")
    assert [e.label for e in spec.experts] == ["depth", "fill"]
    assert spec.experts[1].parents == {"depth": 0.5}
