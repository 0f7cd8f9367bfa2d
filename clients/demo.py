"""The CPU demo: R3's ring × bar product (task T1) with exact ground truth.

Runs poegen and naive score summation (Composable Diffusion) in-process on the analytic
experts at the same expert-call budget, writes a figure with three scatter plots side by side
(exact samples, summation, poegen's weighted particles resampled to equal weights), each
titled with its energy distance to the exact product, and prints the accuracy table of T1.

    poegen demo [--out out/demo_t1.png] [--seeds 3] [--particles 1024]   (or python -m poegen.clients.demo)

No GPU, no downloads; about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo_t1.png"), help="PNG path")
    parser.add_argument("--particles", type=int, default=1024, help="poegen's particles N")
    parser.add_argument("--steps", type=int, default=None, help="noise levels (default 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged in the table")
    parser.add_argument("--reference", type=int, default=8192, help="exact reference draws")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def register(app: Any) -> None:
    return None


def add_parser(subparsers: Any) -> None:
    """Register ``poegen demo``."""
    parser = subparsers.add_parser("demo", help="CPU demo: exact vs summation vs poegen on T1")
    _add_flags(parser)
    parser.set_defaults(func=run)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="poegen demo", description="ring x bar: exact vs summation vs poegen (CPU)"
    )
    _add_flags(parser)
    return parser.parse_args(argv)


def plot(path: Path, panels: list[tuple[str, torch.Tensor]], title: str) -> None:
    """Side-by-side scatter plots with R3's ring and bar drawn faintly for orientation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), dpi=110)
    for ax, (label, points) in zip(axes, panels, strict=True):
        ax.add_patch(Circle((0, 0), 0.5, fill=False, ls=":", color="0.7", lw=0.8))
        ax.add_patch(Rectangle((-0.2, -1), 0.4, 2, fill=False, ls="--", color="0.7", lw=0.8))
        xy = points.reshape(points.shape[0], -1).numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.35, color="tab:blue", edgecolors="none")
        ax.set_title(label, fontsize=10)
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poegen.clients.demo``: the same as ``poegen demo``."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.particles < 8 or args.seeds < 1 or args.reference < 16:
        raise SystemExit("demo: needs --particles >= 8, --seeds >= 1, --reference >= 16")
    torch.set_num_threads(args.threads)
    from poegen.bench import accuracy, metrics, tasks
    from poegen.kernel import particles

    started = time.perf_counter()
    task = tasks.t1()
    config = dataclasses.replace(
        accuracy.FULL,
        seeds=args.seeds,
        num_particles=args.particles,
        num_steps=args.steps,
        reference_size=args.reference,
    )
    task = accuracy.configure(task, config)
    keep: dict = {}
    result = accuracy.run_task(task, config, log=lambda *a, **k: None, keep=keep)

    n = task.settings.num_particles
    generator = torch.Generator().manual_seed(2024)
    exact = task.target.sample(n, generator)
    poe, summed = keep["poegen"], keep["summation"]
    poe_draws = poe.particles[particles.systematic(poe.log_weights, n, generator=generator)]
    summed_draws = summed.particles[
        torch.randperm(summed.particles.shape[0], generator=generator)[:n]
    ]
    ref = accuracy.reference(task, args.reference)
    floor = result["noise_floor"]["energy_distance"]["mean"]
    ed_sum = ref.energy_distance(summed.particles)
    ed_poe = ref.energy_distance(poe.particles, poe.log_weights)
    ed_exact = ref.energy_distance(exact)
    plot(
        args.out,
        [
            (f"exact product (ED {ed_exact:.1e}; floor {floor:.1e})", exact),
            (f"score summation (ED {ed_sum:.1e})", summed_draws),
            (f"poegen (ED {ed_poe:.1e})", poe_draws),
        ],
        f"{task.description}: {n} points each, equal expert-call budget "
        f"({metrics.kish_ess(poe.log_weights, n):.0f} ESS)",
    )
    print(accuracy.format_table({"T1": result}))
    ratio = result["ratios"]["summation"]["energy_distance"]
    print(
        f"\npoegen / summation energy distance: {ratio:.3f} "
        f"(poegen {result['methods']['poegen']['summary']['energy_distance']['mean']:.2e}, "
        f"noise floor {floor:.2e})"
    )
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
