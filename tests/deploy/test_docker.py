"""deploy/docker: the Dockerfiles lint clean and keep the images' rules; the entry point and
the experts' server settings work with a real ``poegen serve``; the docs' build commands name
real files, build arguments and the images the stacks use.

No container engine exists here, so nothing is built: hadolint reads the Dockerfiles, and
what the images run (entry point, ``server.yaml``, the ``poegen serve`` command line) runs
outside a container with the container-only values (bind address, ports, /models) swapped for
local ones.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml
from helpers.docs import docs_section
from helpers.timing import scaled

from poegen.clients.cli import main as poegen_main
from poegen.v1 import expert_pb2, expert_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")
# what the images copy besides the package: the entry point, the in-container settings, and
# the vLLM image's pins (those of the project's own vLLM environment)
IMAGE_FILES = {f"deploy/docker/{name}" for name in ("entrypoint.sh", "server.yaml", "sampler.yaml")}
VLLM_PINS = "scripts/vllm-constraints.txt"
FAMILIES = {"analytic", "flow", "vlm", "vllm", "physics", "sampler"}


def tool(name: str) -> str:
    """A linter of the dev extra, from this venv (a system copy may be another version)."""
    path = BIN / name
    assert path.exists(), f"{name} is missing: install the dev extra (pip install -e '.[dev]')"
    return str(path)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


# --------------------------------------------------------------------------- lint


def test_there_is_one_dockerfile_per_family() -> None:
    assert {path.name.removesuffix(".Dockerfile") for path in DOCKERFILES} == FAMILIES


def test_hadolint_with_that_config_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    """The lint can fail: root user, unpinned apt packages, apt lists left behind."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode != 0
    assert "DL3008" in done.stdout and "DL3009" in done.stdout


def test_shellcheck_finds_nothing_in_the_shell_scripts() -> None:
    scripts = [DOCKER / "entrypoint.sh", REPO / "deploy" / "tokens.sh"]
    done = subprocess.run(
        [tool("shellcheck"), "--shell=sh", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- the images' rules


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = [args for keyword, args in final_stage(dockerfile) if keyword == "USER"]
    assert users == ["10001:10001"]
    entry = [args for keyword, args in final_stage(dockerfile) if keyword == "ENTRYPOINT"]
    assert entry == ['["poegen-entrypoint"]']


def build_context() -> set[str]:
    """What the build stage must copy: the files pyproject.toml reads and every folder of
    its package-dir (a package added there without a COPY here breaks every image)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = project["tool"]["setuptools"]["package-dir"].values()
    return {"constraints.txt", "pyproject.toml", project["project"]["readme"], *folders}


def copied(dockerfile: Path) -> list[str]:
    """The sources of the COPY instructions that read the build context."""
    steps = [args for keyword, args in instructions(dockerfile) if keyword == "COPY"]
    return [
        source.rstrip("/")
        for args in steps
        if "--from=" not in args
        for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_image_copies_the_whole_package_and_no_weights(dockerfile: Path) -> None:
    """The build stage copies every package folder (so `pip install .` finds them all) and
    nothing else but deploy/docker's own files; expert images take weights from /models."""
    sources = copied(dockerfile)
    needed = build_context()
    for path in needed:
        assert any(path == s or path.startswith(f"{s}/") for s in sources), (dockerfile, path)
    extra = {s for s in sources if not any(n == s or n.startswith(f"{s}/") for n in needed)}
    assert extra <= IMAGE_FILES | ({VLLM_PINS} if dockerfile.stem == "vllm" else set())
    assert not re.search(r"\.(safetensors|bin|pt|pth|ckpt|gguf)\b", dockerfile.read_text())
    if dockerfile.stem != "sampler":
        assert ("VOLUME", '["/models"]') in final_stage(dockerfile)
        assert "HF_HUB_OFFLINE=1" in dockerfile.read_text()


def test_the_build_context_the_images_copy_builds_the_wheel(tmp_path: Path) -> None:
    """`pip install .` in the build stage sees only what the Dockerfiles copy: that much
    builds poegen's wheel, shipped digit models included."""
    own = IMAGE_FILES | {VLLM_PINS}
    contexts = {tuple(p for p in copied(f) if p not in own) for f in DOCKERFILES}
    (paths,) = contexts  # the same in every image
    context = tmp_path / "src"
    for path in paths:
        source = REPO / path
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, context / path)
    done = subprocess.run(
        [*PIP_WHEEL, "-w", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheels").glob("poegen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(
        n.endswith("digits/weights/flow-all/diffusion_pytorch_model.safetensors") for n in names
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_torch_comes_from_the_variants_index_at_the_pinned_version(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert "ARG TORCH_VARIANT=cpu" in text
    assert 'https://download.pytorch.org/whl/${TORCH_VARIANT}" ' in text
    assert "\"$(grep '^torch==' constraints.txt)\"" in text
    installs = [args for keyword, args in instructions(dockerfile) if "pip install" in args]
    project = [args for args in installs if '"."' in args or '".[' in args]
    assert project and all("-c constraints.txt" in args for args in project)
    assert (REPO / "constraints.txt").read_text().count("torch==") == 1


def test_the_physics_image_renders_through_egl() -> None:
    text = (DOCKER / "physics.Dockerfile").read_text()
    assert "MUJOCO_GL=egl" in text
    assert "libegl-mesa0" in text and "libgl1-mesa-dri" in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics" in text


def test_every_image_command_is_a_valid_poegen_command_line() -> None:
    """Each CMD parses with the real CLI (flags, backend name) without running it."""
    import typer

    from poegen.clients.cli import build_app
    from poegen.expert_servers.server.backends import backend_names

    group = typer.main.get_command(build_app())
    for dockerfile in DOCKERFILES:
        cmd = [args for keyword, args in final_stage(dockerfile) if keyword == "CMD"]
        argv = yaml.safe_load(cmd[0])
        assert argv[0] == "poegen"
        command = group.commands[argv[1]]  # type: ignore[attr-defined]
        command.make_context(argv[1], list(argv[2:]))
        if argv[1] == "serve":
            assert argv[2] in backend_names()
            assert argv[argv.index("--config") + 1] == "/etc/poegen/server.yaml"


# --------------------------------------------------------------------------- entry point


def entrypoint(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *argv],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )


def test_the_entrypoint_exports_each_token_file_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("expert-secret\n")
    (tmp_path / "admin").write_text("admin-secret")
    show = 'printf \'%s|%s|%s\' "$POEGEN_TOKEN" "$POEGEN_ADMIN_TOKEN" "${POEGEN_TOKEN_FILE-unset}"'
    done = entrypoint(
        "sh",
        "-c",
        show,
        env={
            "POEGEN_TOKEN_FILE": str(tmp_path / "token"),
            "POEGEN_ADMIN_TOKEN_FILE": str(tmp_path / "admin"),
        },
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "expert-secret|admin-secret|unset"


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_the_entrypoint_refuses_a_token_file_it_cannot_use(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "expert-token"
    if content is not None:
        path.write_text(content)
    done = entrypoint("true", env={"POEGEN_EXPERT_TOKEN_FILE": str(path)})
    assert done.returncode == 2
    assert "POEGEN_EXPERT_TOKEN_FILE" in done.stderr and str(path) in done.stderr


def local_server_yaml(tmp_path: Path, model_root: Path) -> Path:
    """deploy/docker/server.yaml with its container-only values made local: loopback, free
    ports, a host folder for /models. Everything else is the shipped file's."""
    data = yaml.safe_load((DOCKER / "server.yaml").read_text())
    shipped = data["server"]
    assert (shipped["host"], shipped["metrics_host"]) == ("0.0.0.0", "0.0.0.0")
    assert (shipped["port"], shipped["metrics_port"], shipped["model_root"]) == (
        50051,
        9464,
        "/models",
    )
    shipped.update(host="127.0.0.1", metrics_host="127.0.0.1", port=0, metrics_port=0)
    shipped["model_root"] = str(model_root)
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def read_announcements(proc: subprocess.Popen[str], count: int) -> list[str]:
    """The first ``count`` stdout lines, or fail after a scaled minute."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        while len(lines) < count and (line := proc.stdout.readline()):
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(scaled(60))
    assert len(lines) == count, f"stdout so far: {lines}"
    return lines


def test_an_expert_image_command_serves_with_tokens_from_files(tmp_path: Path) -> None:
    """The analytic image's command line through the entry point, as compose runs it: token
    files (written by deploy/tokens.sh) become the server's tokens, health answers without a
    token (the compose health check), model RPCs need it, /metrics serves."""
    secrets = tmp_path / "secrets"
    subprocess.run(["sh", str(REPO / "deploy" / "tokens.sh"), str(secrets)], check=True)
    models = REPO / "examples" / "experts"
    config = local_server_yaml(tmp_path, models)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "POEGEN_TOKEN_FILE": str(secrets / "expert-token"),
        "POEGEN_ADMIN_TOKEN_FILE": str(secrets / "admin-token"),
    }
    argv = [
        "poegen",
        "serve",
        "analytic",
        "--config",
        str(config),
        "--model",
        str(models / "ring.yaml"),
    ]
    proc = subprocess.Popen(
        ["sh", str(DOCKER / "entrypoint.sh"), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        serving, metrics = read_announcements(proc, 2)
        address = serving.removeprefix("poegen: serving analytic on ")
        metrics_address = metrics.removeprefix("poegen: metrics on ")
        deadline = scaled(30)
        # the compose health check's command (until the load through LoadModel is done)
        assert _eventually(lambda: poegen_main(["health", address]) == 0, deadline)
        token = (secrets / "expert-token").read_text()
        with grpc.insecure_channel(address) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            reply = stub.Describe(
                expert_pb2.DescribeRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=deadline,
            )
            assert reply.model_id == "ring.yaml"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Describe(expert_pb2.DescribeRequest(), timeout=deadline)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        scraped = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=deadline)
        assert "poegen_model_serving 1.0" in scraped.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(scaled(30))
    assert status == 0, proc.stderr.read() if proc.stderr else ""


def _eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------- docs


def declared_args(dockerfile: Path) -> set[str]:
    return {args.split("=")[0] for keyword, args in instructions(dockerfile) if keyword == "ARG"}


def images_the_stacks_use() -> set[str]:
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "compose.yaml").read_text())
    used = {service["image"] for service in compose["services"].values()}
    for overlay in ("cpu", "gpu"):
        kustomization = REPO / "deploy" / "k8s" / "overlays" / overlay / "kustomization.yaml"
        for image in yaml.safe_load(kustomization.read_text())["images"]:
            used.add(f"{image['name']}:{image['newTag']}")
    return used


def test_the_docs_build_commands_name_real_files_arguments_and_used_images() -> None:
    """`docker build` cannot run here: each one names a Dockerfile, only ARGs it declares,
    the repository root as context, and a tag that a stack (compose or k8s) uses or the
    vLLM/VLM families' naming (poegen/FAMILY:cpu|cuda)."""
    commands = docs_section("Images")
    builds = [c for c in commands if c.startswith("docker build ")]
    lints = [c for c in commands if c.startswith("hadolint ")]
    assert len(builds) + len(lints) == len(commands), commands
    used = images_the_stacks_use()
    for command in builds:
        argv = shlex.split(command)
        dockerfile = REPO / argv[argv.index("-f") + 1]
        assert dockerfile in DOCKERFILES, command
        assert argv[-1] == ".", command
        for i, word in enumerate(argv):
            if word == "--build-arg":
                assert argv[i + 1].split("=")[0] in declared_args(dockerfile), command
        tag = argv[argv.index("-t") + 1]
        family = dockerfile.name.removesuffix(".Dockerfile")
        variant = "cuda" if "TORCH_VARIANT=cu" in command else "cpu"
        assert tag == f"poegen/{family}:{variant}", command
        assert tag in used or family in {"vllm", "vlm", "physics"}, command
    assert {tag for tag in used if tag.startswith("poegen/")} <= {
        shlex.split(c)[shlex.split(c).index("-t") + 1] for c in builds
    }


def test_hadolint_as_the_docs_run_it_finds_nothing_in_any_dockerfile() -> None:
    """Every finding fails (failure-threshold: style in deploy/docker/.hadolint.yaml)."""
    config = yaml.safe_load((DOCKER / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] == "style"
    (lint,) = [c for c in docs_section("Images") if c.startswith("hadolint ")]
    argv = shlex.split(lint)
    assert argv[:3] == ["hadolint", "--config", "deploy/docker/.hadolint.yaml"]
    assert sorted(REPO.glob(argv[3])) == DOCKERFILES
    done = subprocess.run(
        [tool("hadolint"), *argv[1:3], *map(str, sorted(REPO.glob(argv[3])))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stdout + done.stderr
