"""The metrics of the three paper recipes' runs on real checkpoints, in one table and one JSON.

Points at the output folders of the recipes' documented runs and measures each with its
module (each app optional; the recipe folders default to ``examples/paper/<app>`` under the
current folder, the repository root in the docs' commands):

* ``--editing DIR``: ``bench/paper_editing.py``: background MSE/PSNR against the photo,
  foreground SSIM/MSE against the graphics render;
* ``--video DIR``: ``bench/paper_video.py``: foreground IoU against the simulation;
* ``--layout DIR``: ``bench/paper_layout.py``: VQAScore by ``--judge`` (a VLM folder other
  than the reward's) and box IoU by ``--detector`` (a zero-shot detection folder).

::

    python -m poegen.bench.apps_checkpoints --editing out/paper-editing --video out/paper-video \\
        --layout out/paper-layout/L8 --judge JUDGE_FOLDER --detector DETECTOR_FOLDER

The JSON (``--out``, default ``bench/results/apps_checkpoints.json``) carries the commit and
whether the measuring code was dirty (``bench/provenance.py``). A figure is a measurement only
on real checkpoints: runs of the tests' tiny random models are not, and none is committed.
Refusals (a judge that is the reward, a folder without samples) exit 2 with the field named.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from poegen.bench import provenance

APPS = ("editing", "video", "layout")


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m poegen.bench.apps_checkpoints", description=__doc__.split("\n")[0]
    )
    for app in APPS:
        p.add_argument(f"--{app}", type=Path, metavar="OUT_DIR", help=f"a {app} run's folder")
        p.add_argument(
            f"--{app}-recipe",
            type=Path,
            default=Path("examples/paper") / app,
            metavar="DIR",
            help=f"the {app} recipe's folder (default: examples/paper/{app})",
        )
    p.add_argument("--judge", type=Path, help="layout: a VLM folder for VQAScore, not the reward's")
    p.add_argument(
        "--judge-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="layout: a VLM option of the judge (docs/vlm.md: device, dtype, max_batch)",
    )
    p.add_argument("--detector", type=Path, help="layout: a zero-shot object-detection folder")
    p.add_argument("--detector-threshold", type=float, default=0.1, help="its minimum score")
    p.add_argument("--detector-device", default="cpu", help="where the detector runs")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/apps_checkpoints.json"),
        help="the JSON written (default: bench/results/apps_checkpoints.json)",
    )
    return p


def _json_value(value: float) -> float | str:
    # JSON has no inf (a PSNR of identical pixels): written as the string, as paper_editing does
    return value if math.isfinite(value) else str(value)


def table(results: dict[str, dict[str, float]]) -> str:
    """One row per metric: app, metric, value."""
    rows = [
        (app, name, f"{value:.4g}") for app, fig in results.items() for name, value in fig.items()
    ]
    widths = [max(len(r[i]) for r in [("app", "metric", "value"), *rows]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("app", "metric", "value"), widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, dict[str, float]]]:
    """Measure every app given: the JSON's content, and the figures as measured."""
    # taken first: the code as it was when the measurement started
    origin = provenance.stamp("apps_checkpoints")
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, str]] = {}
    if args.editing is not None:
        from poegen.bench import paper_editing

        results["editing"] = paper_editing.measure(args.editing_recipe, args.editing)
    if args.video is not None:
        from poegen.bench import paper_video

        results["video"] = paper_video.measure(args.video_recipe, args.video)
    if args.layout is not None:
        from poegen.bench import paper_layout

        detector = None
        if args.detector is not None:
            detector = paper_layout.TransformersDetector(
                args.detector, threshold=args.detector_threshold, device=args.detector_device
            )
        results["layout"] = paper_layout.measure(
            args.layout_recipe,
            args.layout,
            judge=args.judge,
            detector=detector,
            judge_options=dict(args.judge_option),
        )
    for app in results:
        runs[app] = {
            "recipe": str(getattr(args, f"{app}_recipe")),
            "outputs": str(getattr(args, app)),
        }
    if args.judge is not None:
        runs.setdefault("layout", {})["judge"] = str(args.judge)
    if args.detector is not None:
        runs.setdefault("layout", {})["detector"] = str(args.detector)
    return {
        "provenance": origin,
        "runs": runs,
        "metrics": {
            app: {k: _json_value(v) for k, v in fig.items()} for app, fig in results.items()
        },
    }, results


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if all(getattr(args, app) is None for app in APPS):
        p.error("give at least one of --editing, --video, --layout")
    if args.layout is None and (args.judge is not None or args.detector is not None):
        p.error("--judge and --detector measure a layout run: give --layout")
    try:
        data, results = run(args)
    except ValueError as err:  # a refusal: the field is in the message
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
