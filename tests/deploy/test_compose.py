"""deploy/compose: the stack validates against the compose specification's JSON schema, and
says what the schema cannot check consistently with the rest of poegen: the Sampler may call
exactly the stack's experts, every command is a ``poegen`` command line whose model paths exist
in the mounted folders, health checks ask the ports the servers listen on, tokens come from
secrets that are never committed. The laptop and compose commands of docs/deploy.md run here
or, where they need a container engine, are checked against these files.
"""

from __future__ import annotations

import ast
import copy
import importlib.resources
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from helpers.docs import docs_section
from helpers.timing import scaled

from poegen.clients.cli import build_app
from poegen.clients.files import load_model_file
from poegen.clients.spec import GenerationSpec
from poegen.expert_servers.server.backends import backend_names
from poegen.expert_servers.server.cli import model_location
from poegen.expert_servers.server.config import parse_server_config
from poegen.kernel.service import SamplerServerConfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
BIN = Path(sys.executable).parent
TOKENS = ("expert-token", "admin-token", "sampler-token")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def experts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in data["services"].items() if s["command"][1] == "serve"}


def compose_schema() -> dict[str, Any]:
    """The compose specification's schema as check-jsonschema ships it (no network)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def server_port() -> int:
    return yaml.safe_load((REPO / "deploy" / "docker" / "server.yaml").read_text())["server"][
        "port"
    ]


def sampler_settings() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "sampler.yaml").read_text())["sampler"]


# --------------------------------------------------------------------------- the schema


def test_the_docs_validation_command_passes() -> None:
    (command,) = [c for c in docs_section("Compose") if c.startswith("check-jsonschema ")]
    argv = shlex.split(command)
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert argv[-1] == "deploy/compose/compose.yaml"


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["ring"].update(comand=["poegen"]),  # a misspelt key
        lambda d: d["services"]["sampler"]["healthcheck"].update(intervall="30s"),
        lambda d: d["services"]["sampler"]["depends_on"]["ring"].update(condition="healthy"),
        lambda d: d["services"]["ring"].update(command=42),
        lambda d: d["secrets"]["expert-token"].update(fle="x"),
    ],
    ids=["service-key", "healthcheck-key", "condition", "command-type", "secret-key"],
)
def test_the_schema_refuses_a_broken_stack(break_it: Any) -> None:
    """The validation can fail: the same schema rejects small mistakes in a copy."""
    validator = jsonschema.Draft202012Validator(compose_schema())
    data = compose()
    validator.validate(data)
    broken = copy.deepcopy(data)
    break_it(broken)
    assert list(validator.iter_errors(broken))


# ----------------------------------------------------------------- what the schema cannot check


def test_the_sampler_may_call_exactly_the_stacks_experts() -> None:
    data = compose()
    names = set(experts(data))
    assert names == {"ring", "bar", "all", "low", "even", "reward"}
    settings = sampler_settings()
    assert set(settings["allowed_experts"]) == {f"{name}:{server_port()}" for name in names}
    # the compose Sampler presents the expert token: the config must accept that
    SamplerServerConfig.model_validate({**settings, "expert_token": "x"})
    assert set(data["services"]["sampler"]["depends_on"]) == names


def test_every_expert_command_serves_a_model_of_its_mounted_folder(tmp_path: Path) -> None:
    """Each expert's command parses with the real CLI, names an installed backend and the
    image's server.yaml, and its --model is a file or folder of the host folder mounted at
    /models, inside the model root (the checks `poegen serve` makes at start)."""
    group = typer.main.get_command(build_app())
    shipped = yaml.safe_load((REPO / "deploy" / "docker" / "server.yaml").read_text())["server"]
    for name, service in experts(compose()).items():
        argv = service["command"]
        group.commands["serve"].make_context("serve", list(argv[2:]))  # type: ignore[attr-defined]
        assert argv[2] in backend_names(), name
        assert argv[argv.index("--config") + 1] == "/etc/poegen/server.yaml", name
        (volume,) = service["volumes"]
        source, target, mode = volume.split(":")
        assert (target, mode) == ("/models", "ro"), name
        host_root = (COMPOSE_DIR / source).resolve()
        model = PurePosixPath(argv[argv.index("--model") + 1])
        local = host_root / model.relative_to(target)
        assert local.exists(), f"{name}: {local} is not in the mounted folder"
        config = parse_server_config({**shipped, "model_root": host_root})
        model_id, root, _ = model_location(str(local), config.model_root)
        assert (model_id, root) == (model.name, host_root), name


def test_health_checks_ask_the_ports_the_servers_listen_on() -> None:
    data = compose()
    for name, service in experts(data).items():
        assert service["healthcheck"]["test"] == [
            "CMD",
            "poegen",
            "health",
            f"127.0.0.1:{server_port()}",
        ], name
    sampler = data["services"]["sampler"]
    port = sampler_settings()["port"]
    assert sampler["healthcheck"]["test"] == ["CMD", "poegen", "health", f"127.0.0.1:{port}"]
    assert sampler["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert all("ports" not in service for service in experts(data).values())


def test_tokens_come_from_secrets_that_are_never_committed() -> None:
    data = compose()
    for name, service in data["services"].items():
        env = service["environment"]
        assert not {"POEGEN_TOKEN", "POEGEN_ADMIN_TOKEN", "POEGEN_EXPERT_TOKEN"} & set(env), name
        files = {key: value for key, value in env.items() if key.endswith("_FILE")}
        assert files, name
        for path in files.values():
            secret = PurePosixPath(path)
            assert secret.parent == PurePosixPath("/run/secrets"), name
            assert secret.name in service["secrets"], name
    assert {name: s["file"] for name, s in data["secrets"].items()} == {
        token: f"./secrets/{token}" for token in TOKENS
    }
    for token in TOKENS:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"deploy/compose/secrets/{token}"], cwd=REPO
        )
        assert ignored.returncode == 0, f"deploy/compose/secrets/{token} is not git-ignored"


def test_tokens_sh_writes_three_distinct_tokens_once(tmp_path: Path) -> None:
    target = tmp_path / "secrets"
    run = ["sh", str(REPO / "deploy" / "tokens.sh"), str(target)]
    subprocess.run(run, check=True, capture_output=True, timeout=scaled(30))
    tokens = {name: (target / name).read_text() for name in TOKENS}
    assert len(set(tokens.values())) == 3
    assert all(len(t) == 64 and int(t, 16) >= 0 for t in tokens.values())  # 256 bits, hex
    assert (target.stat().st_mode & 0o777) == 0o700
    subprocess.run(run, check=True, capture_output=True, timeout=scaled(30))
    assert {name: (target / name).read_text() for name in TOKENS} == tokens  # kept


def test_the_compose_spec_is_the_example_with_compose_addresses() -> None:
    spec = yaml.safe_load((COMPOSE_DIR / "t1.yaml").read_text())
    example = yaml.safe_load((REPO / "examples" / "t1.yaml").read_text())
    assert {k: v for k, v in spec.items() if k not in ("experts", "sample_shape", "output")} == {
        k: v for k, v in example.items() if k != "experts"
    }
    assert [e["address"] for e in spec["experts"]] == [
        f"{e['endpoint']}:{server_port()}" for e in example["experts"]
    ]


# --------------------------------------------------------------------------- docs


def test_the_docs_compose_commands_run_or_name_what_is_checked_here(tmp_path: Path) -> None:
    """tokens.sh runs (on a copy of deploy/); `docker compose` names this compose file; the
    generate command's spec loads and calls only experts the Sampler may call, on the port
    it publishes, with the token file tokens.sh writes."""
    commands = docs_section("Compose")
    handled = 0
    for command in commands:
        argv = shlex.split(command)
        if argv[:2] == ["sh", "deploy/tokens.sh"]:
            copy_of = tmp_path / "repo"
            ignore = shutil.ignore_patterns(*TOKENS)  # a developer's own tokens stay out
            shutil.copytree(REPO / "deploy", copy_of / "deploy", ignore=ignore)
            subprocess.run(argv, cwd=copy_of, check=True, capture_output=True, timeout=scaled(30))
            assert all((copy_of / argv[2] / name).stat().st_size == 64 for name in TOKENS)
            assert argv[2] == "deploy/compose/secrets"
        elif argv[:2] == ["docker", "compose"]:
            assert argv[2:4] == ["-f", "deploy/compose/compose.yaml"] and argv[4] in ("up", "down")
        elif "poegen generate" in command:
            check_generate(command)
        elif argv[0] == "check-jsonschema":
            pass  # test_the_docs_validation_command_passes runs it
        else:
            raise AssertionError(f"docs/deploy.md: unchecked command {command!r}")
        handled += 1
    assert handled == len(commands) >= 4


def check_generate(command: str) -> None:
    prefix = 'POEGEN_TOKEN="$(cat deploy/compose/secrets/sampler-token)" '
    assert command.startswith(prefix), command
    argv = shlex.split(command.removeprefix(prefix))
    assert argv[:3] == ["poegen", "generate", "deploy/compose/t1.yaml"]
    assert argv[argv.index("--sampler") + 1] == f"127.0.0.1:{sampler_settings()['port']}"
    spec = load_model_file(GenerationSpec, REPO / argv[2])
    allowed = set(sampler_settings()["allowed_experts"])
    assert spec.sample_shape and spec.output.decode == "none"
    assert all(e.address in allowed for e in spec.experts)


def test_the_laptop_command_is_the_one_the_cli_tests_run() -> None:
    """Starting three processes costs tens of seconds on a loaded 2-core machine, so the
    laptop command is the very command line that tests/clients/test_cli.py runs
    (test_generate_with_its_own_stack_from_the_examples): checked here, word for word."""
    (command,) = docs_section("On a laptop")
    argv = shlex.split(command)
    assert argv[0] == "poegen" and argv[-2] == "-o"
    tree = ast.parse((REPO / "tests" / "clients" / "test_cli.py").read_text())
    (test,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name == "test_generate_with_its_own_stack_from_the_examples"
    ]
    run_there = [
        [e.value for e in node.elts if isinstance(e, ast.Constant)]
        for node in ast.walk(test)
        if isinstance(node, ast.List)
    ]
    assert argv[1:-1] in run_there, run_there
