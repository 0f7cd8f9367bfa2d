"""``poegen demo --app editing``: a rendered bar turns held-out 6s into 8s, through a local stack.

The editing application of :mod:`poegen.expert_servers.digits.editing` with every expert a
``poegen serve`` process (the stack of ``examples/editing/stack.yaml``: the prior ``prior``,
the masked-target constraint ``masked`` — used twice, as the keep and as the stroke tie —,
the ``reward`` classifier and the ``graphics`` expert on the asset root) and every job a
client request to the Sampler service (the spec of ``examples/editing/spec.yaml``). The
graphics expert is a condition **source**: the masked targets take their ``mask`` from its
Render (``keep`` and ``silhouette``), linked by the Sampler. Per input:

* ``poegen``: prior × keep × stroke tie × reward "eight";
* ``prior inpainting``: prior × keep only, as many particles as poegen's evaluations buy;
* ``paste``: the input with the silhouette set white (no expert evaluated).

It writes ``out/demo_editing.png`` (per method a row of edits, one per input) and
``out/demo_editing.json`` (``{"metric", "higher_is_better", "poegen", "baselines",
"evaluations", "psnr", "iou"}``), judged by the held-out classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from poegen.clients.demo import (
    DemoOptions,
    demo_settings,
    evaluations,
    generate_all,
    say,
    served_stack,
)

STARTUP_TIMEOUT_S = 600.0  # generous: a busy machine imports torch slowly
INPUTS = 6  # held-out 6s edited
EXAMPLE_INPUT = 0  # the held-out 6 of examples/editing/input.safetensors


def stack_mapping(asset_root: Path) -> dict[str, Any]:
    """The stack of ``examples/editing/stack.yaml``, with the shipped models' own paths and
    the graphics expert on ``asset_root``."""
    from poegen.expert_servers.digits import editing, model_path

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = {"env": env, "startup_timeout_s": STARTUP_TIMEOUT_S}
    zeros = torch.zeros(editing.SAMPLE_SHAPE).tolist()  # the shape; each job gives its target
    return {
        "experts": [
            {"name": "prior", "backend": "flow", "model": str(model_path("flow-all"))} | common,
            {"name": "masked", "backend": "analytic", "expert": "masked_target",
             "params": {"target": zeros, "weight": editing.KEEP_WEIGHT, "name": "masked"}}
            | common,
            {"name": "reward", "backend": "classifier",
             "model": str(model_path("classifier-reward"))} | common,
            {"name": "graphics", "backend": "graphics", "model": str(asset_root)} | common,
        ],
        "sampler": {"max_jobs": 2},
    }  # fmt: skip


def spec_mapping(
    input_file: Path, key: str = "input", seed: int = 0, **settings: Any
) -> dict[str, Any]:
    """The spec of ``examples/editing/spec.yaml``: the input is tensor ``key`` of
    ``input_file`` (a .safetensors file that also holds ``white``, the stroke's +1 target)."""
    from poegen.expert_servers.digits import editing

    base = editing.settings()

    def target(name: str, weight: float) -> dict[str, Any]:
        file = {"file": str(input_file), "key": name}
        return {"tensors": {"target": file}, "scalars": {"weight": weight}}

    experts = [
        {"endpoint": "prior"},
        {"endpoint": "masked", "name": "keep", "condition": target(key, editing.KEEP_WEIGHT),
         "links": [{"tensor": "mask", "source": "render", "output": "keep"}]},
        {"endpoint": "masked", "name": "stroke",
         "condition": target("white", editing.STROKE_WEIGHT),
         "links": [{"tensor": "mask", "source": "render", "output": "insert"}]},
        {"endpoint": "reward", "name": f"is-{editing.TARGET_LABEL}",
         "weight": editing.REWARD_WEIGHT, "condition": {"text": editing.TARGET_LABEL}},
    ]  # fmt: skip
    source = {
        "name": "render", "endpoint": "graphics",
        "condition": {
            "text": editing.placement_text(),
            "scalars": {"margin": editing.MARGIN, "opacity": editing.OPACITY},
        },
    }  # fmt: skip
    chosen = {
        "num_particles": base.num_particles, "num_steps": base.num_steps,
        "mcmc_steps": base.mcmc_steps, "step_size": base.step_size,
    } | settings  # fmt: skip
    return {
        "seed": seed, "sample_shape": list(editing.SAMPLE_SHAPE), "settings": chosen,
        "experts": experts, "sources": [source], "output": {"samples": 8},
    }  # fmt: skip


def write_inputs(path: Path, count: int = INPUTS) -> Path:
    """The held-out 6s as ``input-<k>`` (and ``input``, the first) plus ``white`` (+1), each
    ``(1, 16, 16)``, in a .safetensors file."""
    from safetensors.torch import save_file

    from poegen.expert_servers.digits import editing

    digits = editing.held_out_sources(count)
    tensors = {f"input-{k}": d.contiguous() for k, d in enumerate(digits)}
    tensors["input"] = digits[EXAMPLE_INPUT].clone()
    tensors["white"] = torch.ones(editing.SAMPLE_SHAPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def jobs(input_file: Path, particles: int, steps: int, count: int) -> dict[str, dict[str, Any]]:
    """Every job's spec mapping by name: ``poegen-<k>`` and ``inpainting-<k>`` per input."""
    from poegen.bench import baselines
    from poegen.kernel.spec import SamplerSettings

    todo: dict[str, dict[str, Any]] = {}
    for k in range(count):
        poegen = spec_mapping(input_file, f"input-{k}", seed=k, num_particles=particles,
                              num_steps=steps) | {"output": {"decode": "none"}}  # fmt: skip
        settings = SamplerSettings(**poegen["settings"])
        per_particle = baselines.cost_per_particle(settings, 1, 3)
        inpainting = dict(poegen, experts=poegen["experts"][:2])
        n = particles * per_particle // baselines.cost_per_particle(settings, 1, 1)
        inpainting["settings"] = poegen["settings"] | {"num_particles": n}
        todo[f"poegen-{k}"], todo[f"inpainting-{k}"] = poegen, inpainting
    return todo


def run(options: DemoOptions, *, start_stack: Any = None) -> int:
    """The editing demo (see the module docstring)."""
    import tempfile

    from poegen.clients.layout_demo import figure
    from poegen.clients.sdk import Client
    from poegen.expert_servers.digits import compose, editing

    particles, steps, out = demo_settings(
        options, particles=32, steps=20, out="out/demo_editing.png"
    )
    started = time.perf_counter()
    say(f"poegen demo --app editing: {INPUTS} held-out {editing.SOURCE_DIGIT}s + a rendered bar "
        f"-> '{editing.TARGET_LABEL}'")  # fmt: skip
    say("starting a local stack: 4 expert servers (prior, masked target, reward classifier, "
        "graphics) + the Sampler service ...")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="poegen-editing-") as tmp:
        root = editing.write_assets(Path(tmp) / "assets")
        masks = editing.render(root)
        todo = jobs(write_inputs(Path(tmp) / "input.safetensors"), particles, steps, INPUTS)
        with (
            served_stack(stack_mapping(root), start_stack, started, jobs=len(todo)) as stack,
            Client.from_stack(stack, in_process=options.in_process) as client,
        ):
            results = generate_all(client, todo, width=13)
    judge = compose.load_judge()
    images = editing.held_out_sources(INPUTS)
    scores: dict[str, list[dict[str, float]]] = {"poegen": [], "prior inpainting": [], "paste": []}
    shown: dict[str, list[torch.Tensor]] = {m: [] for m in scores}
    for k, image in enumerate(images):
        for method, job in (("poegen", f"poegen-{k}"), ("prior inpainting", f"inpainting-{k}")):
            result = results[job]
            edited = editing.composite(image, result.particles, masks.keep)
            scores[method].append(editing.metrics(judge, edited, result.log_weights, image, masks))
            shown[method].append(edited[int(result.log_weights.argmax())])
        pasted = editing.paste(image, masks.silhouette)
        scores["paste"].append(editing.metrics(judge, pasted[None], None, image, masks))
        shown["paste"].append(pasted)
    mean = {m: {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
            for m, rows in scores.items()}  # fmt: skip
    spent = {
        "poegen": sum(evaluations(results[f"poegen-{k}"]) for k in range(INPUTS)) // INPUTS,
        "prior inpainting": sum(evaluations(results[f"inpainting-{k}"]) for k in range(INPUTS))
        // INPUTS,
        "paste": 0,
    }
    record = {
        "metric": "judge share of the target label", "higher_is_better": True,
        "poegen": mean["poegen"]["judge_share"],
        "baselines": {m: s["judge_share"] for m, s in mean.items() if m != "poegen"},
        "evaluations": spent["poegen"],
        "psnr": {m: s["psnr"] for m, s in mean.items()},
        "iou": {m: s["iou"] for m, s in mean.items()},
        "evaluations_per_method": spent,
        "inputs": INPUTS,
    }  # fmt: skip
    rows = [("input", images)] + [
        (f"{m}  [judge: {mean[m]['judge_share']:.1%} {editing.TARGET_LABEL}]", torch.stack(x))
        for m, x in shown.items()
    ]
    figure(out, rows, f"editing: held-out {editing.SOURCE_DIGIT}s + a rendered bar -> "
           f"'{editing.TARGET_LABEL}' (best particle per input)")  # fmt: skip
    record_path = out.with_suffix(".json")
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    say("")
    say(f"{'method':<18} {'judge share':>11} {'PSNR dB':>8} {'IoU':>6} {'evals':>7}")
    for m, s in mean.items():
        say(f"{m:<18} {s['judge_share']:11.1%} {s['psnr']:8.1f} {s['iou']:6.3f} {spent[m]:7d}")
    say(f"\nwrote {out.resolve()} and {record_path.name} in {time.perf_counter() - started:.1f}s")
    return 0
