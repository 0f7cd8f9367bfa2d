"""The physics video recipe through the SDK: Wan VACE depth × Wan I2V (docs/paper-video.md).

    python examples/paper/video/generate.py -o out/paper-video-sdk                  # one job
    python examples/paper/video/generate.py --autoregressive -o out/paper-video-ar  # chunks

Without ``--sampler`` it starts the stack of ``stack.yaml`` beside it (:class:`LocalStack`) and
stops it at the end; with ``--sampler HOST:PORT --endpoint NAME=HOST:PORT ...`` it uses a stack
already up (``poegen up`` prints the addresses).

**One job** (the default): ``spec.yaml`` as it is, the outputs of ``poegen generate``.

**Autoregressive** (``--autoregressive``, :mod:`poegen.clients.autoregressive`): the video in
``--chunks`` jobs of 4m + 1 pixel frames each, consecutive chunks sharing one frame. Chunk k's
job is the same product on its own frames: VACE takes the simulation's depth frames
[4mk, 4mk + 4m] (rendered once by the physics expert, handed over as a tensor), I2V takes as
its first frame the last decoded frame of chunk k − 1 (chunk 0: ``first_frame.png``). Each
chunk is decoded by Wan's VAE on its own, so the video is joined in pixels: chunk 0's frames,
then every later chunk's without its first (the frame it was given). It writes
``video.mp4``, ``video.safetensors`` (``video`` (3, F, H, W) in [-1, 1], ``latents``: the
chunks' latents side by side), ``chunks.json``, the handed-over tensors under
``conditions/`` and each chunk's ``poegen generate`` outputs under ``chunk_K/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from poegen import Client, GenerationSpec, LocalStack, write_outputs
from poegen.clients.autoregressive import (
    AutoregressiveResult,
    Chunk,
    generate_autoregressive,
    tensor_file,
)

HERE = Path(__file__).resolve().parent
TIME_STRIDE = 4  # Wan 2.1's VAE: latent frame j >= 1 holds pixel frames 4(j - 1) + 1 ... 4j


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    endpoints = dict(e.split("=", 1) for e in args.endpoint)
    with contextlib.ExitStack() as stack:
        if args.sampler is None:
            local = stack.enter_context(LocalStack.from_yaml(args.stack))
            client = stack.enter_context(Client.from_stack(local))
        else:
            client = stack.enter_context(Client(args.sampler, endpoints=endpoints))
        if args.autoregressive:
            chunked = autoregressive(client, args.spec, args.out, args.chunks, args.timeout)
        else:
            spec = GenerationSpec.from_file(args.spec)
            result = client.generate(spec, timeout=args.timeout)
    # written once the client is closed, as `poegen generate` does: an MP4 starts ffmpeg, and
    # a fork while the client's gRPC threads are busy lost the child under load (measured:
    # "ffmpeg wrote no sample_000.mp4" after gRPC's "skipping fork() handlers")
    written = (
        chunked.write(args.out) if args.autoregressive else write_outputs(result, args.out, spec)
    )
    for path in written:
        print(path)
    return 0


@dataclass(frozen=True, slots=True)
class ChunkedVideo:
    """An autoregressive run: the driver's result, each chunk's spec, the joined video."""

    made: AutoregressiveResult
    specs: tuple[GenerationSpec, ...]
    video: torch.Tensor  # (3, F, H, W) in [-1, 1]
    fps: int

    def write(self, out: Path) -> list[Path]:
        """Each chunk's outputs under ``chunk_K/``, then the joined video (module docstring)."""
        from safetensors.torch import save_file

        from poegen.clients.outputs import to_uint8, write_video

        written: list[Path] = []
        for chunk, result, spec in zip(
            self.made.chunks, self.made.results, self.specs, strict=True
        ):
            written += write_outputs(result, out / f"chunk_{chunk.index}", spec)
        paths = [out / "video.mp4", out / "video.safetensors", out / "chunks.json"]
        write_video(paths[0], to_uint8(self.video), self.fps)
        tensors = {"video": self.video.contiguous(), "latents": self.made.frames.contiguous()}
        save_file(tensors, str(paths[1]))
        made = self.made
        record = {
            "frames": int(self.video.shape[1]),
            "chunks": [{"index": c.index, "latent_frames": c.frames, "picked": p,
                        "evaluations": sum(s for e in r.trace for (_, _, s) in e.timings.values())}
                       for c, p, r in zip(made.chunks, made.picked, made.results, strict=True)],
        }  # fmt: skip
        paths[2].write_text(json.dumps(record, indent=1))
        return written + paths


def autoregressive(
    client: Client, spec_file: Path, out: Path, count: int, timeout: float | None = None
) -> ChunkedVideo:
    """The recipe's video in ``count`` chunks (see the module docstring); the tensors handed
    over between chunks go to ``out/conditions``, the rest is written by ``.write(out)``."""
    base = yaml.safe_load(spec_file.read_text())
    latent_frames = int(base["sample_shape"][1])
    if count < 1 or (latent_frames - 1) % count:
        raise ValueError(
            f"--chunks: {latent_frames - 1} latent frames after the first do not split into "
            f"{count} chunks"
        )
    new = (latent_frames - 1) // count  # each chunk: m = new frames after the one it is given
    depth = _simulated_depth(client, spec_file, base)
    conditions = out / "conditions"
    decoded: list[torch.Tensor] = []  # each chunk's decoded video (3, 4m + 1, H, W)
    specs: dict[int, GenerationSpec] = {}

    def spec_for(chunk: Chunk, made: torch.Tensor | None) -> GenerationSpec:
        start = TIME_STRIDE * new * chunk.index  # the chunk's first pixel frame
        frames = TIME_STRIDE * new + 1
        data = json.loads(json.dumps(base))  # a deep copy of the plain mapping
        data["seed"] = int(base.get("seed", 0)) + chunk.index
        data["sample_shape"][1] = chunk.frames
        data["sources"] = []  # the depth comes sliced, as a tensor
        data["output"] = {**base.get("output", {}), "samples": 1}  # decode the one kept
        vace, i2v = _factor(data, "vace"), _factor(data, "i2v")
        vace["links"] = []
        vace["condition"].setdefault("tensors", {})["depth"] = tensor_file(
            conditions, f"depth-{chunk.index}", depth[start : start + frames]
        )
        i2v["condition"].setdefault("scalars", {})["num_frames"] = frames
        if decoded:  # the first frame: the previous chunk's last
            i2v["condition"]["tensors"]["image"] = tensor_file(
                conditions, f"image-{chunk.index}", decoded[-1][:, -1]
            )
        specs[chunk.index] = GenerationSpec.from_mapping(data, base_dir=spec_file.parent)
        return specs[chunk.index]

    def on_chunk(chunk: Chunk, result: Any) -> None:
        decoded.append(result.pixels[0])
        print(f"chunk {chunk.index + 1}/{count}: {result.seconds:.1f} s", file=sys.stderr)

    made = generate_autoregressive(
        client, spec_for, count * (new + 1), new + 1, frame_dim=1,
        pick=lambda result: result.image_indices[0], on_chunk=on_chunk, timeout=timeout,
    )  # fmt: skip
    # pick is the decoded particle (the highest weight), so the hand-over and the video agree
    video = torch.cat([decoded[0], *(d[:, 1:] for d in decoded[1:])], dim=1)
    fps = int(base.get("output", {}).get("fps", 8))
    return ChunkedVideo(made, tuple(specs[c.index] for c in made.chunks), video, fps)


def _simulated_depth(client: Client, spec_file: Path, base: dict[str, Any]) -> torch.Tensor:
    """The physics source's depth video (F, 1, H, W), rendered once for all chunks."""
    from poegen.kernel.remote import RemoteExpert

    source = GenerationSpec.from_mapping(base, base_dir=spec_file.parent).sources[0]
    address = source.resolve_address(client.endpoints)
    condition = source.condition.to_proto() if source.condition is not None else None
    with RemoteExpert.connect(address, condition=condition) as physics:
        return physics.render(["depth"])["depth"]


def _factor(data: dict[str, Any], name: str) -> dict[str, Any]:
    (factor,) = [e for e in data["experts"] if e.get("name") == name]
    factor.setdefault("condition", {})
    return factor


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--spec", type=Path, default=HERE / "spec.yaml")
    p.add_argument(
        "--stack", type=Path, default=HERE / "stack.yaml", help="started unless --sampler"
    )
    p.add_argument("--sampler", help="HOST:PORT of a running Sampler (poegen up)")
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=HOST:PORT")
    p.add_argument("--autoregressive", action="store_true", help="frame chunks, one job each")
    p.add_argument("--chunks", type=int, default=2, help="autoregressive: how many chunks")
    p.add_argument("--timeout", type=float, default=None, help="seconds per job")
    return p


if __name__ == "__main__":
    sys.exit(main())
