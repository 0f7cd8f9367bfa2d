"""The paper's layout recipe from Python: regional FLUX experts × VQAScore at L = 1, 8, 32.

Runs ``spec.yaml`` (this folder) once per particle count on one stack, so FLUX.1-dev and the
VLM load once for the whole sweep, and writes each run's outputs to ``OUT/L<n>/``
(``poegen generate``'s files: PNGs best first, the contact sheet, ``particles.safetensors``,
``trace.json``). See docs/paper-layout.md::

    python examples/paper/layout/generate.py --particles 1 8 32 -o out/paper-layout

Without ``--sampler`` it starts ``stack.yaml`` (this folder) for the sweep; with it, it uses a
running stack (``poegen up``), its experts named by ``--endpoint NAME=HOST:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from poegen import Client, GenerationSpec, LocalStack, write_outputs

HERE = Path(__file__).resolve().parent
PRESETS = (1, 8, 32)  # the paper's particle counts L (its text-to-image particle ablation)


def spec_for(particles: int, spec_file: Path = HERE / "spec.yaml") -> GenerationSpec:
    """The recipe's spec with ``num_particles`` set to ``particles`` (L)."""
    spec = GenerationSpec.from_file(spec_file)
    data = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    data.setdefault("settings", {})["num_particles"] = particles
    return GenerationSpec.from_mapping(data, base_dir=spec_file.parent, source=str(spec_file))


@contextlib.contextmanager
def connect(sampler: str | None, endpoints: dict[str, str], stack: Path) -> Iterator[Client]:
    """A client of the running stack at ``sampler``, or of ``stack`` started for the sweep."""
    if sampler is not None:
        with Client(sampler, endpoints=endpoints) as client:
            yield client
        return
    with LocalStack.from_yaml(stack) as local, Client.from_stack(local) as client:
        yield client


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, nargs="+", choices=PRESETS, default=[8])
    parser.add_argument("-o", "--out", type=Path, default=Path("out/paper-layout"))
    parser.add_argument("--stack", type=Path, default=HERE / "stack.yaml")
    parser.add_argument("--sampler", help="HOST:PORT of a running stack's Sampler")
    parser.add_argument("--endpoint", action="append", default=[], help="NAME=HOST:PORT")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    args = parser.parse_args(argv)
    endpoints = dict(pair.split("=", 1) for pair in args.endpoint)
    with connect(args.sampler, endpoints, args.stack) as client:
        for particles in args.particles:
            spec = spec_for(particles)
            result = client.generate(spec, timeout=args.timeout)
            out = args.out / f"L{particles}"
            write_outputs(result, out, spec)
            print(
                f"L={particles}: {result.particles.shape[0]} particles in {result.seconds:.1f} s,"
                f" best #{result.best_index}, ESS {result.ess:.1f} -> {out}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
