"""``poegen demo``: the demos, each through a real local stack.

::

    poegen demo [--app digits|layout|editing|video ...] [--analytic] [--out PNG] [--seeds 3]
                [--particles N] [--steps N] [--reference 8192] [--in-process]
    bash scripts/demo.sh            # the same, after installing what it needs

**The applications** (the default, each through its own local stack, in turn; ``--app NAME``
runs some of them): the digit compositions (:mod:`poegen.clients.digits_demo`, one contact
sheet), the layout application (:mod:`poegen.clients.layout_demo`, a figure and
``out/demo_layout.json``), editing (:mod:`poegen.clients.editing_demo`) and the physics-driven
video (:mod:`poegen.clients.video_demo`, a contact sheet, an MP4 and ``out/demo_video.json``).

**The analytic demo** (``--analytic``): R3's ring × bar
product (task T1 of :mod:`poegen.bench.tasks`) with exact ground truth. It brings up a
:class:`~poegen.clients.stack.LocalStack`: the ring and the bar as two ``poegen serve
analytic`` processes and the Sampler service as a third; then, as a client of that Sampler
(:class:`~poegen.clients.sdk.Client`), it runs poegen and naive score summation (Composable
Diffusion: the same kernel without MCMC and weights) at the same expert-call budget, for each
seed. It writes a figure with three scatter plots side by side (exact samples, summation,
poegen's weighted particles resampled to equal weights), each titled with its energy distance
to the exact product, prints the accuracy table of T1, and stops the stack. No GPU, no
downloads; about a minute on 2 CPU cores, most of it starting the three processes.

``--in-process`` runs the same jobs with the kernel in this process (the experts stay
remote), skipping the Sampler service.

Adding an application: write ``run(options: DemoOptions) -> int`` in a module, add it to
:data:`DEMOS` under its name and to :data:`APPS` (``poegen demo --app NAME`` selects it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

logger = logging.getLogger(__name__)

DEMOS: dict[str, str] = {
    "analytic": "poegen.clients.demo:run_analytic",
    "digits": "poegen.clients.digits_demo:run",
    "layout": "poegen.clients.layout_demo:run",
    "editing": "poegen.clients.editing_demo:run",
    "video": "poegen.clients.video_demo:run",
}
"""Demo name → ``module:function`` taking :class:`DemoOptions` and returning the status."""
APPS = ("digits", "layout", "editing", "video")
"""What ``poegen demo`` runs by default, in order (``--app NAME`` picks some)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DemoOptions:
    """What every demo takes (a demo ignores what it has no use for)."""

    out: Path | None = None
    particles: int | None = None
    steps: int | None = None
    seeds: int = 3
    reference: int = 8192
    threads: int = 2
    in_process: bool = False


def demo_function(name: str) -> Callable[[DemoOptions], int]:
    module, _, function = DEMOS[name].partition(":")
    return getattr(importlib.import_module(module), function)


# --------------------------------------------------------------------------- shared by the demos


def say(line: str) -> None:
    """Print a demo's progress line at once (a demo's output is read as it runs)."""
    print(line, flush=True)


def demo_settings(
    options: DemoOptions, *, particles: int, steps: int, out: str
) -> tuple[int, int, Path]:
    """``(particles, steps, figure path)``: the options' or the demo's defaults, checked; sets
    torch's thread count from the options."""
    particles, steps = options.particles or particles, options.steps or steps
    if particles < 4 or steps < 2:
        raise ValueError("demo: needs --particles >= 4 and --steps >= 2")
    torch.set_num_threads(options.threads)
    return particles, steps, options.out or Path(out)


@contextlib.contextmanager
def served_stack(
    mapping: dict[str, Any],
    start_stack: Any,
    started: float,
    *,
    sampler: bool = False,
    jobs: int | None = None,
) -> Iterator[Any]:
    """Start the demo's stack (``start_stack(mapping)``, default a process per server with
    :meth:`LocalStack.from_mapping <poegen.clients.stack.LocalStack.from_mapping>`), say where
    each server listens and how long the start took; say when it has stopped."""
    from poegen.clients.stack import LocalStack

    with (start_stack or LocalStack.from_mapping)(mapping) as stack:
        for name, address in stack.endpoints.experts.items():
            say(f"  expert {name:<10} at {address}")
        if sampler:
            say(f"  sampler           at {stack.endpoints.sampler}")
        count = "" if jobs is None else f"; {jobs} jobs ..."
        say(f"stack up in {time.perf_counter() - started:.1f}s{count}")
        yield stack
    say("stack stopped")


def evaluations(result: Any) -> int:
    """The expert evaluations a job's result spent, summed over its levels."""
    return sum(s for event in result.trace for (_, _, s) in event.timings.values())


def generate_all(client: Any, todo: dict[str, dict[str, Any]], width: int) -> dict[str, Any]:
    """Every job of ``todo`` (name → spec mapping), two at a time; each one's size, evaluations
    and seconds said as it ends (names padded to ``width``)."""
    from poegen.clients.spec import GenerationSpec

    def one(name: str) -> tuple[str, Any]:
        t0 = time.perf_counter()
        result = client.generate(GenerationSpec.from_mapping(todo[name]))
        say(f"  {name:<{width}} {result.particles.shape[0]:4d} particles, "
            f"{evaluations(result):6d} evaluations, {time.perf_counter() - t0:.1f}s")  # fmt: skip
        return name, result

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, todo))


# --------------------------------------------------------------------------- the analytic demo


def t1_stack(task: Any) -> dict[str, Any]:
    """A stack file's contents serving the task's generative experts (inline expert files)."""
    experts = []
    for factor in task.factors:
        e = factor.expert
        experts.append(
            {
                "name": e.name,
                "backend": "analytic",
                "expert": "gaussian_mixture",
                "params": {
                    "means": e.means.tolist(),
                    "covariances": e.covariances.tolist(),
                    "weights": e.weights.tolist(),
                    "name": e.name,
                },
                "latent_space": "toy-2d",
            }
        )
    # three small processes on few cores: one torch thread each (see poegen.clients.stack)
    return {"experts": experts, "sampler": {"max_jobs": 2}, "env": {"OMP_NUM_THREADS": "1"}}


def remote_runner(client: Any, log: Callable[[str], None]) -> Callable[..., Any]:
    """``runner(method, task, seed, total) -> baselines.Run`` through ``client``."""
    from poegen.bench import baselines
    from poegen.clients.spec import GenerationSpec

    def run(method: str, task: Any, seed: int, total: int) -> Any:
        if method == "poegen":
            factors, settings = task.factors, task.settings
        elif method == "summation":
            factors = task.generative
            base = baselines.model_sampler(task.settings)
            n = max(1, total // baselines.cost_per_particle(base, len(factors), 0))
            settings = base.model_copy(update={"num_particles": n})
        else:  # not applicable to T1 (no rewards); run in-process as the bench does
            return baselines.run(method, task, seed, total)
        spec = GenerationSpec.from_mapping(
            {
                "seed": seed,
                "sample_shape": list(task.sample_shape),
                "settings": settings.model_dump(),
                "experts": [{"endpoint": f.expert.name, "weight": f.weight} for f in factors],
                "output": {"decode": "none"},
            }
        )
        started = time.perf_counter()
        result = client.generate(spec)
        seconds = time.perf_counter() - started
        evaluations: dict[str, int] = {}
        for event in result.trace:
            for name, (_, _, samples) in event.timings.items():
                evaluations[name] = evaluations.get(name, 0) + samples
        log(
            f"  {method:<9} seed {seed}: {settings.num_particles:5d} particles, "
            f"{len(result.trace)} levels, {sum(evaluations.values()):,} evaluations, "
            f"{seconds:.1f}s"
        )
        weighted = method == "poegen"
        particles = result.particles.to(torch.float64)
        return baselines.Run(
            method,
            particles,
            result.log_weights if weighted else None,
            result.log_evidence if weighted else float("nan"),
            particles[result.best_index] if weighted else None,
            evaluations,
            settings.num_particles,
            seconds,
        )

    return run


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


def run_analytic(options: DemoOptions) -> int:
    """The analytic demo (see the module docstring)."""
    from poegen.bench import accuracy, metrics, tasks
    from poegen.clients.sdk import Client
    from poegen.clients.stack import LocalStack
    from poegen.kernel import particles

    if (options.particles or 1024) < 8 or options.seeds < 1 or options.reference < 16:
        raise ValueError("demo: needs --particles >= 8, --seeds >= 1, --reference >= 16")
    torch.set_num_threads(options.threads)
    out = options.out or Path("out/demo_t1.png")
    started = time.perf_counter()
    task = tasks.t1()
    config = dataclasses.replace(
        accuracy.FULL,
        seeds=options.seeds,
        num_particles=options.particles,
        num_steps=options.steps,
        reference_size=options.reference,
    )
    task = accuracy.configure(task, config)
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"poegen demo: {task.description}; exact product vs score summation vs poegen")
    say("starting a local stack: 2 expert servers (ring, bar) + the Sampler service …")
    with LocalStack.from_mapping(t1_stack(task)) as stack:
        endpoints = stack.endpoints
        for name, address in endpoints.experts.items():
            say(f"  expert {name:<6} at {address}")
        say(
            f"  sampler      at {endpoints.sampler}"
            + ("  (unused: --in-process)" if options.in_process else "")
        )
        say(
            f"stack up in {time.perf_counter() - started:.1f}s; running {options.seeds} seed(s) of each method"
        )
        keep: dict = {}
        with Client.from_stack(stack, in_process=options.in_process) as client:
            result = accuracy.run_task(
                task, config, log=lambda *a, **k: None, keep=keep,
                runner=remote_runner(client, say),
            )  # fmt: skip
    say("stack stopped")
    n = task.settings.num_particles
    generator = torch.Generator().manual_seed(2024)
    exact = task.target.sample(n, generator)
    poe, summed = keep["poegen"], keep["summation"]
    poe_draws = poe.particles[particles.systematic(poe.log_weights, n, generator=generator)]
    summed_draws = summed.particles[
        torch.randperm(summed.particles.shape[0], generator=generator)[:n]
    ]
    ref = accuracy.reference(task, options.reference)
    floor = result["noise_floor"]["energy_distance"]["mean"]
    ed_sum = ref.energy_distance(summed.particles)
    ed_poe = ref.energy_distance(poe.particles, poe.log_weights)
    ed_exact = ref.energy_distance(exact)
    plot(
        out,
        [
            (f"exact product (ED {ed_exact:.1e}; floor {floor:.1e})", exact),
            (f"score summation (ED {ed_sum:.1e})", summed_draws),
            (f"poegen (ED {ed_poe:.1e})", poe_draws),
        ],
        f"{task.description}: {n} points each, equal expert-call budget "
        f"({metrics.kish_ess(poe.log_weights, n):.0f} ESS)",
    )
    print()
    print(accuracy.format_table({"T1": result}))
    ratio = result["ratios"]["summation"]["energy_distance"]
    print(
        f"\npoegen / summation energy distance: {ratio:.3f} "
        f"(poegen {result['methods']['poegen']['summary']['energy_distance']['mean']:.2e}, "
        f"noise floor {floor:.2e})"
    )
    print(f"wrote {out} in {time.perf_counter() - started:.1f}s")
    return 0


# --------------------------------------------------------------------------- command


def demo_command(
    analytic: Annotated[
        bool, typer.Option("--analytic", help="the analytic ring x bar demo (exact ground truth)")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="figure path (PNG)")] = None,
    particles: Annotated[int | None, typer.Option(help="poegen's particles N")] = None,
    steps: Annotated[int | None, typer.Option(help="noise levels")] = None,
    seeds: Annotated[int, typer.Option(help="seeds averaged in the table")] = 3,
    reference: Annotated[int, typer.Option(help="exact reference draws")] = 8192,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="run the kernel here, not in the Sampler")
    ] = False,
    app: Annotated[
        list[str] | None,
        typer.Option(help=f"run only these applications ({', '.join(APPS)}); repeatable"),
    ] = None,
) -> int:
    """Run the demos through a real local stack (expert servers + Sampler, CPU, no downloads).

    Default: every application in turn, each its own stack, figure and table: the digit
    compositions (out/demo_digits.png), layout, editing and video (out/demo_APP.png + .json).
    Example: [bold]poegen demo --app layout[/bold]; [bold]poegen demo --analytic[/bold]
    """
    unknown = sorted(set(app or ()) - set(APPS))
    if unknown:
        raise typer.BadParameter(f"unknown app {unknown[0]!r} (known: {', '.join(APPS)})")
    if analytic and app:
        raise typer.BadParameter("give either --analytic or --app")
    if out is not None and not analytic and len(app or APPS) > 1:
        raise typer.BadParameter("--out names one figure: add --app NAME")
    chosen = ["analytic"] if analytic else [a for a in APPS if a in (app or APPS)]
    options = DemoOptions(out, particles, steps, seeds, reference, threads, in_process)
    try:
        for name in chosen:
            status = demo_function(name)(options)
            if status:
                return status
        return 0
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def register(app: typer.Typer) -> None:
    """Add ``poegen demo``."""
    app.command("demo", help=demo_command.__doc__)(demo_command)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags of ``python -m poegen.clients.demo`` (the analytic demo)."""
    parser = argparse.ArgumentParser(
        prog="poegen demo", description="ring x bar: exact vs summation vs poegen (CPU)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo_t1.png"), help="PNG path")
    parser.add_argument("--particles", type=int, default=None, help="poegen's particles N")
    parser.add_argument("--steps", type=int, default=None, help="noise levels (default 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged in the table")
    parser.add_argument("--reference", type=int, default=8192, help="exact reference draws")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--in-process", action="store_true", help="kernel here, no Sampler")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poegen.clients.demo``: the analytic demo, as ``poegen demo --analytic``."""
    args = parse_args(argv)
    options = DemoOptions(
        args.out, args.particles, args.steps, args.seeds, args.reference, args.threads,
        args.in_process,
    )  # fmt: skip
    return run_analytic(options)


if __name__ == "__main__":
    sys.exit(main())
