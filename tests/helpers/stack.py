"""Helpers of the SDK/CLI/stack tests: a real local stack of analytic experts, small specs."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from helpers.timing import scaled

REPO = Path(__file__).resolve().parents[2]

MIX = {
    "means": [[-1.0, 0.0], [1.0, 0.0]],
    "covariances": [[0.2, 0.2], [0.2, 0.2]],
    "weights": [0.5, 0.5],
    "name": "mix",
}
BAR = {"means": [[0.0, 0.0]], "covariances": [[0.5, 0.05]], "weights": [1.0], "name": "bar"}
REWARD = {"direction": [1.0, 0.0], "name": "right"}
SETTINGS = {"num_particles": 32, "num_steps": 8, "mcmc_steps": 1}
ADMIN_TOKEN = "admin-secret"


def stack_data(models: Path) -> dict[str, Any]:
    """Two generative experts (one with a model root for swaps) and a reward, plus a Sampler."""
    return {
        "experts": [
            {
                "name": "mix",
                "expert": "gaussian_mixture",
                "params": MIX,
                "args": ["--model-root", str(models)],
                "env": {"POEGEN_ADMIN_TOKEN": ADMIN_TOKEN},
            },
            {"name": "bar", "expert": "gaussian_mixture", "params": BAR},
            {"name": "right", "expert": "linear_reward", "params": REWARD},
        ],
        "sampler": {"max_jobs": 2},
        "env": {"OMP_NUM_THREADS": "1"},
    }


def write_models(models: Path) -> None:
    """An expert file to swap to (a mixture shifted up)."""
    models.mkdir(parents=True, exist_ok=True)
    shifted = {**MIX, "means": [[-1.0, 2.0], [1.0, 2.0]]}
    (models / "shifted.yaml").write_text(
        yaml.safe_dump({"expert": "gaussian_mixture", "params": shifted})
    )


def spec_data(**overrides: Any) -> dict[str, Any]:
    return {
        "seed": 3,
        "settings": dict(SETTINGS),
        "experts": [{"endpoint": "mix"}, {"endpoint": "bar"}, {"endpoint": "right", "weight": 2.0}],
        **overrides,
    }


def poegen(*args: str, env: dict[str, str] | None = None, timeout: float = scaled(120.0)):
    """Run ``python -m poegen.clients.cli ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "poegen.clients.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = scaled(20.0)) -> list[int]:
    """The pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def lines_until(
    proc: subprocess.Popen[str], prefix: str, timeout: float, log: Path | None = None
) -> list[str]:
    """The stdout lines of ``proc`` up to the first that starts with ``prefix`` (or to its
    end), read within ``timeout`` seconds; on a timeout the assertion quotes ``log``."""
    read: queue.Queue[list[str]] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(prefix):
                break
        read.put(lines)

    threading.Thread(target=reader, daemon=True).start()
    try:
        return read.get(timeout=timeout)
    except queue.Empty:
        tail = f":\n{log.read_text()[-3000:]}" if log is not None else ""
        raise AssertionError(f"no line {prefix!r} within {timeout:.0f} s{tail}") from None


def stack_processes(
    proc: subprocess.Popen[str], timeout: float, log: Path | None = None
) -> dict[str, tuple[str, int]]:
    """What ``poegen up`` printed before ``poegen: stack up``: name → (address, pid) per
    process, read within ``timeout`` seconds (``log`` quoted when a line is missing)."""
    lines = lines_until(proc, "poegen: stack up", timeout, log)
    tail = log.read_text()[-2000:] if log is not None else ""
    assert lines and lines[-1].startswith("poegen: stack up"), f"{lines}\n{tail}"
    rows = [re.fullmatch(r"(\S+)\s+(\S+)\s+pid (\d+)", line) for line in lines[:-1]]
    assert all(rows), f"{lines}\n{tail}"
    return {m.group(1): (m.group(2), int(m.group(3))) for m in rows if m}
