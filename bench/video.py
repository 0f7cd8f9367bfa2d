"""The video application in the digits world: poegen vs baselines at equal expert evaluations.

:mod:`poegen.expert_servers.digits.video`: a 3 moving along a MuJoCo trajectory, 12 frames of
32×48, through a local stack (every expert a ``poegen serve`` process, the stack of
``examples/video/stack.yaml``; the kernel runs in this process, ``Client(in_process=True)``).
Methods, at poegen's evaluations E (samples summed over experts, from the jobs' traces):

* ``poegen``: autoregressive annealing, one job per chunk of 4 frames, the tie across each
  chunk boundary anchored to the previous chunk's last frame (:mod:`poegen.clients.autoregressive`);
* ``joint``: all frames annealed in one job (the same factors), as many particles as E buys;
* ``independent frames``: one job without the temporal ties, as many particles as E buys.

Each method's video is its best particle. Per video: the frame-to-frame appearance change (RMS
of the digit's box crops in consecutive frames, pixels in [0, 1]; the main metric, lower is
better), the label consistency (the share of frames the judge ``classifier-judge``, which
steers nothing, gives the label) and the centroid error (the ink's centroid per frame against
the projected simulated position, pixels). Every figure is a mean over ``--seeds`` seeds with
its standard error. It prints the table and writes ``bench/results/video.json`` stamped with
the commit::

    python -m poegen.bench.video [--quick] [--seeds 4] [--out bench/results/video.json]

The issue's targets: centroid error ≤ 2 px with label consistency ≥ 90 %.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from poegen.bench import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "video.json"
KEYS = ("appearance_change", "label_consistency", "centroid_error_px")
TARGETS = {"centroid_error_px": 2.0, "label_consistency": 0.9}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def bench_video(
    particles: int, steps: int, seeds: int, *, start_stack: Any = None, log: Any = print
) -> dict[str, Any]:
    """poegen and the baselines over ``seeds`` seeds, through one local stack."""
    from poegen.clients import video_demo
    from poegen.clients.sdk import Client
    from poegen.clients.stack import LocalStack
    from poegen.expert_servers.digits import compose, video

    judge = compose.load_judge()
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in video_demo.METHODS}
    evals: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="poegen-bench-video-") as tmp:
        root = video.write_assets(Path(tmp) / "assets")
        with (start_stack or LocalStack.from_mapping)(video_demo.stack_mapping(root)) as stack:
            centres, boxes = video_demo.simulated_boxes(stack.endpoints.experts["physics"])
            with Client.from_stack(stack, in_process=True) as client:
                for seed in range(seeds):
                    jobs = video_demo.VideoJobs(
                        Path(tmp) / f"seed-{seed}", boxes, particles, steps, seed=seed
                    )
                    started = time.perf_counter()
                    videos = video_demo.run_methods(client, jobs, log)
                    log(f"seed {seed}: {time.perf_counter() - started:.1f}s")
                    for method, (frames, e) in videos.items():
                        scores = video.video_metrics(judge, frames, boxes, centres)
                        runs[method].append(scores)
                        evals.setdefault(method, e)
    methods: dict[str, Any] = {}
    for method, rows in runs.items():
        entry: dict[str, Any] = {}
        for key in KEYS:
            entry[key], entry[key + "_se"] = mean_se([r[key] for r in rows])
        entry["evaluations"] = evals[method]
        methods[method] = entry
    poegen = methods["poegen"]
    return {
        "metric": "frame-to-frame appearance change",
        "higher_is_better": False,
        "poegen": poegen["appearance_change"],
        "baselines": {m: v["appearance_change"] for m, v in methods.items() if m != "poegen"},
        "evaluations": poegen["evaluations"],
        "label_consistency": {m: v["label_consistency"] for m, v in methods.items()},
        "centroid_error_px": {m: v["centroid_error_px"] for m, v in methods.items()},
        "targets": {
            "centroid_error_px <= 2": poegen["centroid_error_px"] <= TARGETS["centroid_error_px"],
            "label_consistency >= 0.9": poegen["label_consistency"]
            >= TARGETS["label_consistency"],
        },
        "frames": video.FRAMES, "canvas": list(video.CANVAS), "chunk": video.CHUNK,
        "label": video.LABEL, "seeds": seeds,
        "settings": {"num_particles": particles, "num_steps": steps, "mcmc_steps": 1,
                     "step_size": video.STEP_SIZE},
        "methods": methods,
    }  # fmt: skip


def _se(value: float | None) -> str:
    return "      -" if value is None else f"{value:7.3f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'method':<20} {'change':>7} {'± s.e.':>7} {'label cons.':>11} {'± s.e.':>7} "
        f"{'centroid px':>11} {'± s.e.':>7} {'evals':>7}"
    ]
    for method, row in results["methods"].items():
        lines.append(
            f"{method:<20} {row['appearance_change']:7.3f} {_se(row['appearance_change_se'])} "
            f"{row['label_consistency']:11.3f} {_se(row['label_consistency_se'])} "
            f"{row['centroid_error_px']:11.2f} {_se(row['centroid_error_px_se'])} "
            f"{row['evaluations']:7d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, start_stack: Any = None) -> dict[str, Any]:
    """``python -m poegen.bench.video``; ``start_stack`` replaces ``LocalStack.from_mapping``
    (the tests' in-process stack)."""
    parser = argparse.ArgumentParser(description="poegen video benchmark (digits, MuJoCo)")
    parser.add_argument("--quick", action="store_true", help="4 particles, 2 levels, one seed")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stamp = provenance.stamp("video")
    started = time.perf_counter()
    particles, steps, seeds = (4, 2, 1) if args.quick else (args.particles, args.steps, args.seeds)
    results = bench_video(particles, steps, seeds, start_stack=start_stack)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = {"cpus": torch.get_num_threads(), "python": platform.python_version()}
    results["provenance"] = stamp
    print(table(results))
    print(f"targets (poegen): {results['targets']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} in {results['total_seconds']:.1f}s")
    return results


if __name__ == "__main__":
    main()
