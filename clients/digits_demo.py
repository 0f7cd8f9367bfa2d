"""``poegen demo``: trained digit experts composed over a local stack, one contact sheet.

::

    poegen demo [--out out/demo_digits.png] [--particles 64] [--steps 16] [--in-process]

Starts the shipped digit experts (:mod:`poegen.expert_servers.digits`) as separate server
processes, with the Sampler service, through :class:`~poegen.clients.stack.LocalStack`:

==============  ==================================  =======================================
endpoint        served by                           model
==============  ==================================  =======================================
``all``         ``poegen serve flow``               ``flow-all``: a prior over all digits
``low``         ``poegen serve flow``               ``flow-0to4``: digits 0–4
``even``        ``poegen serve flow``               ``flow-even``: 0, 2, 4, 6, 8
``reward``      ``poegen serve classifier``         ``classifier-reward``: log p(label | x̂_0)
``left-half``   ``poegen serve analytic``           ``masked_target``: a left half tied to a
                                                    target given per job as a condition
==============  ==================================  =======================================

and runs, as a client of the Sampler (:class:`~poegen.clients.sdk.Client`), the three
compositions of :mod:`poegen.expert_servers.digits.compose`:

1. prior × reward "three": SMC over ``--particles`` particles, beside plain prior sampling;
2. the {0–4} prior × the even prior with Langevin moves per level, beside the same product
   without moves and each prior alone;
3. the left half of held-out digits fixed by the masked-target constraint, the prior
   completing the right half.

It writes one contact sheet (PNG, 16 samples per row: equal-weight draws from each weighted
particle set) and prints a table: particles, levels, expert evaluations, seconds, and the
share of samples the *judge* classifier (which steered nothing) puts in the wanted classes.
About a minute on 2 CPU cores, start-up included; no GPU, no downloads.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.clients.demo import DemoOptions, demo_settings, say, served_stack

SHEET_COLUMNS = 16
TILE = 40
LABEL_WIDTH = 270
STARTUP_TIMEOUT_S = 600.0  # generous: a busy machine imports torch slowly
COMPLETIONS = 4  # held-out digits completed (3 completions each on the sheet)


@dataclass(frozen=True)
class Job:
    """One generation of the demo: a row of the sheet and of the table."""

    composition: str
    label: str
    experts: list[dict[str, Any]]
    settings: dict[str, Any]
    wanted: tuple[int, ...]


def stack_mapping(threads: int) -> dict[str, Any]:
    """The stack: five expert servers and the Sampler (one torch thread per expert process)."""
    from poegen.expert_servers.digits import compose, model_path

    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def served(name: str, backend: str, model: str) -> dict[str, Any]:
        return {
            "name": name, "backend": backend, "model": str(model_path(model)), "env": env,
            "startup_timeout_s": STARTUP_TIMEOUT_S,
        }  # fmt: skip

    zeros = torch.zeros(compose.SAMPLE_SHAPE)
    tie = {
        "name": "left-half",
        "backend": "analytic",
        "expert": "masked_target",
        "params": {
            "target": zeros.tolist(),
            "mask": compose.left_half_mask().tolist(),
            "weight": compose.TIE_WEIGHT,
            "name": "left-half",
        },
        "env": env,
        "startup_timeout_s": STARTUP_TIMEOUT_S,
    }
    return {
        "experts": [
            served("all", "flow", "flow-all"),
            served("low", "flow", "flow-0to4"),
            served("even", "flow", "flow-even"),
            served("reward", "classifier", "classifier-reward"),
            tie,
        ],
        "sampler": {"max_jobs": 2},
    }


def jobs(particles: int, steps: int, targets_file: Path, labels: list[int]) -> list[Job]:
    """The rows: plain vs SMC, the product four ways, one completion job per held-out digit."""
    from poegen.expert_servers.digits import compose

    base = {"num_steps": steps}
    smc = base | {"num_particles": particles, "mcmc_steps": 1, "step_size": compose.REWARD_STEP}
    plain = base | {"num_particles": 64, "mcmc_steps": 0}
    product = base | {"num_particles": 32, "mcmc_steps": 3}
    digit = {"condition": {"text": compose.TARGET_LABEL}, "weight": compose.REWARD_WEIGHT}
    low_even = [{"endpoint": "low"}, {"endpoint": "even"}]
    completion = base | {"num_particles": 16, "mcmc_steps": 1, "step_size": compose.COMPLETION_STEP}
    rows = [
        Job("1 reward", "prior alone (plain sampling)", [{"endpoint": "all"}], plain, (3,)),
        Job("1 reward", f"prior x 'is a three' (SMC, {particles} particles)",
            [{"endpoint": "all"}, {"endpoint": "reward"} | digit], smc, (3,)),
        Job("2 product", "{0-4} prior alone", [{"endpoint": "low"}], plain, (0, 2, 4)),
        Job("2 product", "even prior alone", [{"endpoint": "even"}], plain, (0, 2, 4)),
        Job("2 product", "{0-4} x even, no MCMC", low_even, product | {"mcmc_steps": 0}, (0, 2, 4)),
        Job("2 product", "{0-4} x even, 3 Langevin steps/level", low_even, product, (0, 2, 4)),
    ]  # fmt: skip
    for k, label in enumerate(labels):
        tie = {"endpoint": "left-half",
               "condition": {"tensors": {"target": {"file": str(targets_file), "key": f"t{k}"}}}}  # fmt: skip
        rows.append(
            Job("3 completion", f"left half of a held-out {label}, completed",
                [{"endpoint": "all"}, tie], completion, (label,))
        )  # fmt: skip
    return rows


def draws(result: Any, n: int, seed: int) -> Tensor:
    """n equal-weight draws of a weighted particle set (systematic resampling)."""
    from poegen.kernel import particles

    idx = particles.systematic(result.log_weights, n, generator=torch.Generator().manual_seed(seed))
    return result.particles[idx]


def tiles(x0: Tensor) -> list[Any]:
    from PIL import Image

    pixels = (((x0.float() + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p[0].numpy()).resize((TILE, TILE), Image.NEAREST) for p in pixels]


def contact_sheet(path: Path, rows: list[tuple[str, list[Any]]], title: str) -> None:
    """Rows of labelled tiles on a white sheet."""
    from PIL import Image, ImageDraw

    pad, head = 4, 28
    width = LABEL_WIDTH + SHEET_COLUMNS * (TILE + pad) + pad
    sheet = Image.new("L", (width, head + len(rows) * (TILE + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill=0)
    for r, (label, images) in enumerate(rows):
        y = head + r * (TILE + pad)
        draw.text((pad, y + TILE // 2 - 6), label, fill=0)
        for c, image in enumerate(images[:SHEET_COLUMNS]):
            sheet.paste(image, (LABEL_WIDTH + c * (TILE + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def completion_tiles(target: Tensor, completions: Tensor) -> list[Any]:
    """The held-out digit's given left half (right half blank), then its completions."""
    from poegen.expert_servers.digits import compose

    given = torch.where(compose.left_half_mask() > 0, target, torch.full_like(target, -0.6))
    return tiles(torch.cat([given[None], completions]))


def run_jobs(client: Any, todo: list[Job], say: Any) -> list[tuple[Job, Any, float]]:
    """Run the jobs through the Sampler, two at a time (its ``max_jobs``): the experts are
    single-threaded processes, so two jobs on different experts use both cores."""
    from concurrent.futures import ThreadPoolExecutor

    from poegen.clients.spec import GenerationSpec
    from poegen.expert_servers.digits import compose

    def one(k: int, job: Job) -> tuple[Job, Any, float]:
        spec = GenerationSpec.from_mapping({
            "seed": k, "sample_shape": list(compose.SAMPLE_SHAPE), "settings": job.settings,
            "experts": job.experts, "output": {"decode": "none"},
        })  # fmt: skip
        started = time.perf_counter()
        result = client.generate(spec)
        seconds = time.perf_counter() - started
        say(f"  [{k + 1}/{len(todo)}] {job.label}: {seconds:.1f}s")
        return job, result, seconds

    say(f"running {len(todo)} jobs through the Sampler, two at a time ...")
    # the costliest first, and neighbours on different experts (the product's pair vs "all")
    order = sorted(range(len(todo)), key=lambda k: (-_cost(todo[k]), k))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(one, k, todo[k]) for k in order}
        return [futures[k].result() for k in range(len(todo))]


def _cost(job: Job) -> int:
    """Expert evaluations per level of a job (for the running order)."""
    settings = job.settings
    return settings["num_particles"] * len(job.experts) * (1 + settings.get("mcmc_steps", 0))


def run(options: DemoOptions, *, start_stack: Any = None) -> int:
    """The digits demo (see the module docstring).

    ``start_stack(mapping)`` returns the context manager that serves :func:`stack_mapping`
    (its value has ``endpoints``); default :meth:`LocalStack.from_mapping
    <poegen.clients.stack.LocalStack.from_mapping>`, a process per server.
    """
    from safetensors.torch import save_file

    from poegen.clients.sdk import Client
    from poegen.expert_servers.digits import compose

    particles, steps, out = demo_settings(
        options, particles=64, steps=16, out="out/demo_digits.png"
    )
    started = time.perf_counter()
    say("poegen demo: trained digit experts composed (16x16 digits from scikit-learn)")
    say("starting a local stack: 5 expert servers (3 flow priors, a classifier reward, "
        "a masked-target constraint) + the Sampler service ...")  # fmt: skip
    targets, labels = compose.held_out(COMPLETIONS)
    with tempfile.TemporaryDirectory(prefix="poegen-demo-") as tmp:
        targets_file = Path(tmp) / "targets.safetensors"
        save_file({f"t{k}": t.contiguous() for k, t in enumerate(targets)}, targets_file)
        with served_stack(stack_mapping(1), start_stack, started, sampler=True) as stack:
            judge = compose.load_judge()
            with Client.from_stack(stack, in_process=options.in_process) as client:
                todo = jobs(particles, steps, targets_file, labels.tolist())
                results = run_jobs(client, todo, say)
    rows, table = [], []
    for k, (job, result, seconds) in enumerate(results):
        shown = draws(result, SHEET_COLUMNS, seed=k)
        classes = judge.log_probs(compose.to_pixels(result.particles)).argmax(-1)
        hit = torch.isin(classes, torch.tensor(job.wanted)).to(result.weights.dtype)
        share = float((result.weights * hit).sum())
        evaluations = sum(s for e in result.trace for (_, _, s) in e.timings.values())
        table.append(
            (job, result.particles.shape[0], len(result.trace), evaluations, seconds, share)
        )
        if not job.composition.startswith("3"):
            rows.append((f"{job.label}  [judge: {share:.0%}]", tiles(shown)))
    completion_row: list[Any] = []
    completions = [r for job, r, _ in results if job.composition.startswith("3")]
    for k, result in enumerate(completions):
        completion_row += completion_tiles(targets[k], draws(result, 3, seed=100 + k))
    rows.append(("left halves fixed, prior completes (given | 3 completions)", completion_row))
    contact_sheet(
        out, rows, "poegen: products of trained digit experts (all served as gRPC processes)"
    )
    say("")
    say(
        f"{'composition':<13} {'samples':<44} {'N':>4} {'levels':>6} {'evals':>7} {'s':>5} {'judge':>6}"
    )
    for job, n, levels, evaluations, seconds, share in table:
        say(f"{job.composition:<13} {job.label:<44} {n:4d} {levels:6d} {evaluations:7d} "
            f"{seconds:5.1f} {share:6.0%}")  # fmt: skip
    say("judge: share of samples the judge classifier (never used for steering) puts in the "
        "wanted classes {3}; {0,2,4}; the held-out digit's label")  # fmt: skip
    say(f"\nwrote {out.resolve()} in {time.perf_counter() - started:.1f}s")
    return 0
