"""``poegen demo --app layout``: "a 3 here, a 7 there", through a local stack.

The layout application of :mod:`poegen.expert_servers.digits.layout` with every expert a
``poegen serve`` process (the stack of ``examples/layout/stack.yaml``: the class-conditional
prior ``digit``, the ``background`` and the ``reward`` classifier) and every job a client
request to the Sampler service (the spec of ``examples/layout/spec.yaml``):

* ``poegen``: per box the prior and the reward cropped to the box, the background elsewhere;
* ``product without MCMC/SMC``: the generative factors only, Euler, as many particles as
  poegen's evaluations buy;
* ``paste``: each box's prior alone on its 16×16 window, pasted side by side.

It writes ``out/demo_layout.png`` (rows of canvases per method, with the judge's share) and
``out/demo_layout.json`` (``{"metric", "higher_is_better", "poegen", "baselines",
"evaluations"}``), judged by the held-out classifier on each box's crop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.clients.demo import (
    DemoOptions,
    demo_settings,
    evaluations,
    generate_all,
    say,
    served_stack,
)

STARTUP_TIMEOUT_S = 600.0  # generous: a busy machine imports torch slowly
SHOWN = 6  # canvases per row of the figure
SCALE = 4  # pixels per canvas pixel in the figure


def stack_mapping() -> dict[str, Any]:
    """The stack of ``examples/layout/stack.yaml``, with the shipped models' own paths."""
    from poegen.expert_servers.digits import layout, model_path

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    _, height, width = layout.CANVAS
    common = {"env": env, "startup_timeout_s": STARTUP_TIMEOUT_S}
    return {
        "experts": [
            {"name": "digit", "backend": "flow", "model": str(model_path("flow-cond"))} | common,
            {"name": "background", "backend": "analytic", "expert": "blank_canvas",
             "params": {"height": height, "width": width, "std": layout.BACKGROUND_STD},
             "latent_space": "pixels-1"} | common,
            {"name": "reward", "backend": "classifier",
             "model": str(model_path("classifier-reward"))} | common,
        ],
        "sampler": {"max_jobs": 2},
    }  # fmt: skip


def spec_mapping(region_file: Path, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """The spec of ``examples/layout/spec.yaml`` (the background's region read from
    ``region_file``, a PNG of :func:`~poegen.expert_servers.digits.layout.background_region`)."""
    from poegen.expert_servers.digits import layout
    from poegen.expert_servers.digits.train import LABEL_NAMES

    base = layout.settings()
    experts: list[dict[str, Any]] = []
    for i, box in enumerate(layout.LAYOUT):
        experts.append({
            "endpoint": "digit", "name": f"digit-{i}",
            "condition": {"scalars": {"class_label": box.label}}, "crop": list(box.window),
        })  # fmt: skip
    experts.append({"endpoint": "background", "region": {"mask": str(region_file)}})
    for i, box in enumerate(layout.LAYOUT):
        experts.append({
            "endpoint": "reward", "name": f"is-{LABEL_NAMES[box.label]}-{i}",
            "weight": layout.REWARD_WEIGHT, "condition": {"text": LABEL_NAMES[box.label]},
            "crop": list(box.window),
        })  # fmt: skip
    chosen = {
        "num_particles": base.num_particles, "num_steps": base.num_steps,
        "mcmc_steps": base.mcmc_steps, "step_size": base.step_size,
    } | settings  # fmt: skip
    return {
        "seed": seed, "sample_shape": list(layout.CANVAS), "settings": chosen,
        "experts": experts, "output": {"samples": 8},
    }  # fmt: skip


def write_region(path: Path) -> Path:
    """The background's region as a greyscale PNG (255 outside every box)."""
    from PIL import Image

    from poegen.expert_servers.digits import layout

    mask = (layout.background_region(layout.LAYOUT)[0] * 255).to(torch.uint8).numpy()
    Image.fromarray(mask).save(path)
    return path


def jobs(region_file: Path, particles: int, steps: int) -> dict[str, dict[str, Any]]:
    """Every job's spec mapping by name: poegen, the product without MCMC/SMC, one per box."""
    from poegen.bench import baselines
    from poegen.expert_servers.digits import layout
    from poegen.kernel.spec import SamplerSettings

    poegen = spec_mapping(region_file, num_particles=particles, num_steps=steps)
    settings = SamplerSettings(**poegen["settings"])
    boxes = len(layout.LAYOUT)
    total = particles * baselines.cost_per_particle(settings, boxes + 1, boxes)
    plain = {"num_steps": steps, "mcmc_steps": 0, "ess_threshold": 0.0}
    per_particle = baselines.cost_per_particle(baselines.model_sampler(settings), 1, 0)
    product = dict(poegen, experts=poegen["experts"][: boxes + 1], output={"decode": "none"})
    product["settings"] = plain | {"num_particles": total // (per_particle * (boxes + 1))}
    todo = {"poegen": poegen | {"output": {"decode": "none"}}, "product": product}
    for i, box in enumerate(layout.LAYOUT):
        todo[f"box-{i}"] = {
            "seed": 100 + i, "sample_shape": [1, layout.BOX_SIZE, layout.BOX_SIZE],
            "settings": plain | {"num_particles": total // (boxes * per_particle)},
            "experts": [{"endpoint": "digit", "condition": {"scalars": {"class_label": box.label}}}],
            "output": {"decode": "none"},
        }  # fmt: skip
    return todo


def canvases_row(x0: Tensor) -> Any:
    """Canvases side by side, scaled up, one image."""
    from PIL import Image

    pixels = (((x0.float() + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    _, height, width = pixels.shape[1:]
    pad = 4
    row = Image.new("L", (len(pixels) * (width * SCALE + pad), height * SCALE), 255)
    for k, p in enumerate(pixels):
        tile = Image.fromarray(p[0].numpy()).resize((width * SCALE, height * SCALE), Image.NEAREST)
        row.paste(tile, (k * (width * SCALE + pad), 0))
    return row


def figure(path: Path, rows: list[tuple[str, Tensor]], title: str) -> None:
    from PIL import Image, ImageDraw

    images = [(label, canvases_row(x)) for label, x in rows]
    width = max(image.width for _, image in images) + 8
    line = 18
    height = 26 + sum(image.height + line + 6 for _, image in images)
    sheet = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 6), title, fill=0)
    y = 26
    for label, image in images:
        draw.text((4, y), label, fill=0)
        sheet.paste(image, (4, y + line))
        y += image.height + line + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run(options: DemoOptions, *, start_stack: Any = None) -> int:
    """The layout demo (see the module docstring)."""
    import tempfile

    from poegen.bench import apps
    from poegen.clients.digits_demo import draws
    from poegen.clients.sdk import Client
    from poegen.expert_servers.digits import compose, layout

    particles, steps, out = demo_settings(
        options, particles=64, steps=20, out="out/demo_layout.png"
    )
    started = time.perf_counter()
    labels = " ".join(str(b.label) for b in layout.LAYOUT)
    say(f"poegen demo --app layout: digits {labels} in boxes on a {layout.CANVAS[1]}x"
        f"{layout.CANVAS[2]} canvas")  # fmt: skip
    say("starting a local stack: 3 expert servers (class-conditional prior, background, "
        "reward classifier) + the Sampler service ...")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="poegen-layout-") as tmp:
        todo = jobs(write_region(Path(tmp) / "background_region.png"), particles, steps)
        with (
            served_stack(stack_mapping(), start_stack, started, jobs=len(todo)) as stack,
            Client.from_stack(stack, in_process=options.in_process) as client,
        ):
            results = generate_all(client, todo, width=8)
    judge = compose.load_judge()
    poegen, product = results["poegen"], results["product"]
    pasted = layout.paste([results[f"box-{i}"].particles for i in range(len(layout.LAYOUT))])
    methods = {
        "poegen": (poegen.particles, poegen.log_weights, evaluations(poegen)),
        "product without MCMC/SMC": (product.particles, None, evaluations(product)),
        "paste": (pasted, None, sum(evaluations(results[f"box-{i}"]) for i in range(4))),
    }
    scores = {m: apps.layout_metrics(judge, x, w) for m, (x, w, _) in methods.items()}
    record = {
        "metric": "judge share per box", "higher_is_better": True,
        "poegen": scores["poegen"]["judge_share"],
        "baselines": {m: s["judge_share"] for m, s in scores.items() if m != "poegen"},
        "evaluations": methods["poegen"][2],
        "stray_ink": {m: s["stray_ink"] for m, s in scores.items()},
        "evaluations_per_method": {m: e for m, (_, _, e) in methods.items()},
    }  # fmt: skip
    shown = [
        ("poegen", draws(poegen, SHOWN, seed=0)),
        ("product without MCMC/SMC", product.particles[:SHOWN]),
        ("paste", pasted[:SHOWN]),
    ]
    figure(
        out,
        [(f"{m}  [judge: {scores[m]['judge_share']:.1%} of boxes]", x) for m, x in shown],
        f"layout: {labels} in boxes, equal expert evaluations ({methods['poegen'][2]:,})",
    )
    record_path = out.with_suffix(".json")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    say("")
    say(f"{'method':<26} {'judge share':>11} {'stray ink':>9} {'evals':>7}")
    for m, (_, _, e) in methods.items():
        say(f"{m:<26} {scores[m]['judge_share']:11.1%} {scores[m]['stray_ink']:9.4f} {e:7d}")
    say(f"\nwrote {out.resolve()} and {record_path.name} in {time.perf_counter() - started:.1f}s")
    return 0
