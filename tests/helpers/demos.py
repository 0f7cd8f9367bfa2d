"""What the application tests share: a demo's fast form run in this process, and the documented
``poegen generate <example>/spec.yaml --stack <example>/stack.yaml -o …`` command run as written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers.timing import scaled


def run_fast_demo(
    run: Callable[..., int], out: Path, *, particles: int, steps: int, start_stack: Any = None
) -> None:
    """``run`` (a demo's entry point) at ``particles`` and ``steps`` on one torch thread, its
    stack a :class:`helpers.threaded_stack.ThreadedStack` unless ``start_stack`` is given; the
    test's torch thread count is restored after. Fails unless the demo returns 0."""
    from helpers.threaded_stack import ThreadedStack

    from poegen.clients.demo import DemoOptions

    threads = torch.get_num_threads()
    try:
        options = DemoOptions(out=out, particles=particles, steps=steps, threads=1)
        assert run(options, start_stack=start_stack or ThreadedStack) == 0
    finally:
        torch.set_num_threads(threads)


def run_documented_generate(examples: Path, out: Path, *, timeout_s: float = 600) -> None:
    """The docs' ``poegen generate`` of ``examples``' spec on its stack (the stack's processes,
    the Sampler), writing to ``out``; fails with the command's stderr unless it succeeds."""
    command = [
        sys.executable, "-m", "poegen.clients.cli", "generate", str(examples / "spec.yaml"),
        "--stack", str(examples / "stack.yaml"), "-o", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=scaled(timeout_s), check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
