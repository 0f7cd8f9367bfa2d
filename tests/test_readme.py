"""The README's Python blocks, run as written (the only edit: the two expert addresses the
README leaves as ``127.0.0.1:PORT1``/``PORT2`` become those its own ``poegen serve`` commands
print), each in a fresh interpreter from a copy of ``examples/``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.stack import REPO, lines_until
from helpers.timing import scaled

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SERVE = re.findall(r"^ {4}\.venv/bin/poegen serve (analytic --config \S+ --port 0)", README, re.M)


def _run(code: str, cwd: Path, timeout_s: float = 180) -> str:
    (cwd / "block.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "block.py"], cwd=cwd, capture_output=True, text=True,
        timeout=scaled(timeout_s), check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    return tmp_path


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(BLOCKS) == 3 and "LocalStack" in BLOCKS[0] and "RemoteExpert" in BLOCKS[2]
    assert SERVE == [
        "analytic --config examples/mixture.yaml --port 0",
        "analytic --config examples/reward.yaml --port 0",
    ]


def test_the_sdk_block_runs_its_stack_and_writes_its_outputs(workdir: Path) -> None:
    _run(BLOCKS[0], workdir)
    assert (workdir / "out" / "t1" / "particles.safetensors").exists()
    assert (workdir / "out" / "t1" / "trace.json").exists()


def test_the_kernel_block_samples_the_product(workdir: Path) -> None:
    """Every particle the weights keep (finite log-weight) satisfies the half-space x_1 ≤ 0.5,
    and the reward leaves most mass on the right mode."""
    check = """
alive = torch.isfinite(result.log_weights)
kept = result.particles[alive]
print(int(alive.sum()), float(kept[:, 1].max()), float(result.weights[result.particles[:, 0] > 0].sum()))
"""
    alive, highest, right = _run(BLOCKS[1] + check, workdir).split()[-3:]
    assert int(alive) > 0 and float(highest) <= 0.5 and float(right) > 0.9


def test_the_remote_block_gives_the_in_process_result(workdir: Path) -> None:
    """The two documented `poegen serve` commands as processes, then the kernel block's imports
    and the remote block against them: the same bits as the same experts in process."""
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "poegen.clients.cli", "serve", *command.split()],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for command in SERVE
    ]
    try:
        addresses = []
        for server in servers:
            (line,) = lines_until(server, "poegen: serving", scaled(60))[-1:]
            addresses.append(line.rsplit(" ", 1)[-1])
        remote = BLOCKS[2].replace("127.0.0.1:PORT1", addresses[0])
        remote = remote.replace("127.0.0.1:PORT2", addresses[1])
        imports = "\n".join(line for line in BLOCKS[1].splitlines() if "import" in line)
        check = """
import yaml
from poegen.kernel.experts import create_expert
local = [create_expert(d["expert"], **d["params"]) for d in
         (yaml.safe_load(open(f"examples/{n}.yaml")) for n in ("mixture", "reward"))]
same = sample([Factor(local[0]), Factor(local[1], weight=2.0)], (2,), SamplerSettings(),
              generator=torch.Generator().manual_seed(0))
print(torch.equal(result.particles, same.particles))
"""
        assert _run(f"{imports}\n{remote}\n{check}", workdir).split()[-1] == "True"
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=scaled(30))
