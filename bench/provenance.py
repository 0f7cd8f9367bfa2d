"""Where a benchmark result comes from: the commit of the code it measured.

A result JSON carries ``provenance = {"commit", "dirty", "measures"}``, taken when the run
starts: the commit checked out, whether the measured paths had uncommitted changes, and the
paths whose code decides the figures. ``tests/bench/test_bench_results.py`` fails when a committed
result is older than that code (any change to ``measures`` between ``commit`` and HEAD), so a
figure quoted from ``bench/results/`` always describes the code beside it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the kernel's math (the layer tests/kernel/test_layers.py keeps free of the wire): what the
# in-process benchmarks run; the service, the transport and the codec decide none of their figures
KERNEL_MATH = tuple(
    f"kernel/{name}.py"
    for name in (
        "calls", "coupling", "crop", "experts", "mcmc", "particles", "path", "potentials", "problem", "sampler",
        "schedule", "spec", "target", "transition",
    )
)  # fmt: skip
_SUITE = (*KERNEL_MATH, "expert_servers/analytic", "bench/baselines.py", "bench/metrics.py",
          "bench/tasks.py")  # fmt: skip

# the code each benchmark's figures depend on (not its printing or file handling)
MEASURES: dict[str, tuple[str, ...]] = {
    "accuracy": _SUITE,
    "kernel_figures": _SUITE,
    # machine-bound figures (not checked by tests/bench/test_bench_results.py): the stack
    "load": ("kernel", "expert_servers/server", "expert_servers/analytic", "clients"),
    "scale": (
        "kernel",
        "expert_servers/server",
        "expert_servers/flow",
        "bench/slow_expert.py",
        "bench/batching.py",
        "bench/scale.py",
    ),
    "batching": ("kernel", "expert_servers/server", "expert_servers/flow", "bench/batching.py"),
    # the paper recipes' runs on real checkpoints (bench/apps_checkpoints.py): GPU-bound and
    # never committed from tiny models, so not checked either
    "apps_checkpoints": (
        "examples/paper",
        "expert_servers/vlm",
        "expert_servers/graphics",
        "expert_servers/physics",
        "bench/paper_editing.py",
        "bench/paper_video.py",
        "bench/paper_layout.py",
        "bench/apps_checkpoints.py",
    ),
    "apps": (
        *KERNEL_MATH,
        "expert_servers/digits",
        "expert_servers/flow",
        "expert_servers/classifier",
        "expert_servers/analytic",
        "expert_servers/graphics",
        "expert_servers/physics",
        "clients/autoregressive.py",
        "clients/video_demo.py",
        "bench/apps.py",
        "bench/editing.py",
        "bench/video.py",
        "bench/baselines.py",
    ),
    "video": (
        *KERNEL_MATH,
        "expert_servers/digits",
        "expert_servers/flow",
        "expert_servers/classifier",
        "expert_servers/analytic",
        "expert_servers/physics",
        "clients/autoregressive.py",
        "clients/video_demo.py",
        "bench/video.py",
        "bench/baselines.py",
    ),
    "digits": (
        *KERNEL_MATH,
        "expert_servers/digits",
        "expert_servers/flow",
        "expert_servers/classifier",
        "bench/baselines.py",
        "bench/metrics.py",
    ),
}


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def stamp(benchmark: str) -> dict[str, object]:
    """The provenance of a run of ``benchmark`` (a key of :data:`MEASURES`), taken now."""
    measures = list(MEASURES[benchmark])
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", *measures))
    return {"commit": commit, "dirty": dirty, "measures": measures}


def changed_since(commit: str, measures: list[str]) -> list[str]:
    """Files under ``measures`` that differ between ``commit`` and the working tree's HEAD."""
    out = _git("diff", "--name-only", commit, "HEAD", "--", *measures)
    return [line for line in out.splitlines() if line]
