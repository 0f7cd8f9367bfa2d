"""Physics expert throughput, and what a job's condition preparation costs next to a flow level.

Run ``.venv/bin/python bench/physics.py`` (``--quick``: fewer frames and repeats). It prints a
table and writes ``bench/results/physics.json``.

What it measures, in one run, at 64², 256² and 512² pixels (MuJoCo offscreen, ``MUJOCO_GL``
as the physics package sets it: EGL, software-rendered here):

1. **Frames/s** = F / (median seconds of ``PhysicsExpert.simulate``) for a ball dropped next
   to a crate on a plane, F frames at 16 fps: simulation (1 ms steps) plus three render passes
   per frame (RGB, depth, segmentation) and the copies out. Renderer start-up is included
   (once per job, as served).
2. **Preparation / level** = (median seconds of one job's condition preparation) / (median
   seconds of one flow level). Preparation is what the Sampler does once per job for a
   physics-driven FLUX depth job at that size: the physics expert's ``prepare`` (simulate and
   render one frame, VAE-encode it into the constraint's latent target, pool the mask) plus the
   FLUX depth-control expert's ``prepare`` of the linked depth (prompt encoding, VAE-encoding
   the control image). One flow level is one batched ``velocity`` call of that FLUX expert on
   ``--particles`` particles (the transition; each MCMC step adds one more).

The FLUX expert is a *tiny random* FluxControlPipeline built here from configs (one double and
one single block, 2 heads of 16, a VAE with 8× spatial compression like FLUX's, so 512² pixels
are 64×64 latents and 1024 tokens, FLUX's own token count), loaded through ``FluxAdapter``. A
real FLUX.1-Depth level costs orders of magnitude more on any device, so the ratio here is an
upper bound of what preparation adds to a real job. Times are medians after one warm-up; on a
loaded machine rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from poegen.expert_servers.physics import PhysicsExpert
from poegen.expert_servers.physics.engine import mujoco
from poegen.expert_servers.server import Condition, ModelRef

SIZES = (64, 256, 512)
RESULTS = Path(__file__).resolve().parent / "results" / "physics.json"


def scene(side: int, frames: int) -> str:
    return f"""
objects:
  - {{name: ball, shape: sphere, size: [0.1], mass: 0.2, position: [0, 0, 1.2],
      colour: [0.9, 0.1, 0.1]}}
  - {{name: crate, shape: box, size: [0.15, 0.15, 0.15], position: [0.6, 0.3, 0.15],
      colour: [0.1, 0.3, 0.9]}}
camera: {{position: [0, -5, 0.8], look_at: [0, 0, 0.8], fov: 40}}
width: {side}
height: {side}
frames: {frames}
fps: 16
"""


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_flux(path: Path) -> Path:
    """A tiny FluxControlPipeline with an 8× VAE (see the module docstring)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlPipeline,
        FluxTransformer2DModel,
    )
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    corpus = [
        "a red ball falls next to a blue crate on a grey floor",
        "a photo of a green cube on a wooden table in the garden",
        "a video of a sphere rolling down a hill at sunset, mountains and snow",
    ] * 4
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>"))  # fmt: skip
    (path / "_bpe").mkdir(parents=True)
    bpe.model.save(str(path / "_bpe"))
    clip_tok = CLIPTokenizer(vocab=str(path / "_bpe" / "vocab.json"),
                             merges=str(path / "_bpe" / "merges.txt"), model_max_length=77)  # fmt: skip
    from tokenizers import SentencePieceUnigramTokenizer

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(corpus, vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>")  # fmt: skip
    vocab = [tuple(v) for v in json.loads(sp.to_str())["model"]["vocab"]]
    t5_tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, projection_dim=32))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37,
        num_layers=2, num_heads=4, relative_attention_num_buckets=8))  # fmt: skip
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)  # fmt: skip
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=128, out_channels=64,
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True)  # fmt: skip
    FluxControlPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    ).save_pretrained(path / "flux")  # fmt: skip
    return path / "flux"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    parser.add_argument("--frames", type=int, default=8, help="frames per simulated clip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.frames, args.repeats = 2, 1
    torch.set_num_threads(args.threads)

    from poegen.expert_servers.flow import FluxAdapter

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_flux(root)
        flux = FluxAdapter().load(ModelRef("flux", folder), {}, lambda f, m: None).expert
        physics = PhysicsExpert(root, autoencoder=flux)  # type: ignore[arg-type]
        for side in SIZES:
            clip = Condition(text=scene(side, args.frames))
            sim = median_seconds(lambda c=clip: physics.simulate(c), args.repeats)
            image = Condition(text=scene(side, 1))

            def prepare(image: Condition = image) -> None:
                view = physics.prepare(image)
                depth = view.render()["depth"]
                flux.prepare(Condition(text="a red ball", tensors={"depth": depth}))

            prep = median_seconds(prepare, args.repeats)
            depth = physics.prepare(image).render()["depth"]
            view = flux.prepare(Condition(text="a red ball", tensors={"depth": depth}))
            latents = torch.randn(args.particles, 16, side // 8, side // 8,
                                  generator=torch.Generator().manual_seed(0))  # fmt: skip
            sigma = torch.full((args.particles,), 0.5)
            level = median_seconds(
                lambda v=view, x=latents, s=sigma: v.velocity(x, s), args.repeats
            )
            rows.append(dict(side=side, frames=args.frames, simulate_s=sim,
                             frames_per_s=args.frames / sim, prepare_s=prep, level_s=level,
                             prepare_over_level=prep / level))  # fmt: skip
    print(f"MuJoCo {mujoco.__version__}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'size':>6} {'frames/s':>9} {'prepare s':>10} {'level s':>9} {'prep/level':>11}")
    for r in rows:
        print(f"{r['side']:>4}² {r['frames_per_s']:>9.2f} {r['prepare_s']:>10.3f} "
              f"{r['level_s']:>9.4f} {r['prepare_over_level']:>11.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "mujoco": mujoco.__version__, "mujoco_gl": os.environ.get("MUJOCO_GL"),
                    "torch": torch.__version__,
                    "load_average_1min": [load_before, os.getloadavg()[0]]},
        "settings": {"frames": args.frames, "repeats": args.repeats,
                     "particles": args.particles, "quick": args.quick},
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
