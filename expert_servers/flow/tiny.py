"""Tiny random-weight diffusers model folders, for tests, benchmarks and offline demos.

Each builder creates a real model or pipeline from a config (weights under a fixed seed,
tokenizers trained offline from a small corpus) and saves it with ``save_pretrained``, so the
adapters can be exercised through their own ``from_pretrained`` loading code with nothing from
a hub. Sizes follow diffusers' own test configs (recipes: the environment notes, section 3);
``transformer=`` overrides the transformer's config (the benchmark builds larger ones)::

    build_flux(root / "flux")                         # FluxPipeline, 16×16 pixels → 16×8×8
    build_flux(root / "flux_depth", control=True)     # FluxControlPipeline
    build_sd3(root / "sd3")                           # 4-channel VAE, 16×16 → 4×8×8
    build_wan(root / "wan")                           # 9×32×32 → 16×3×4×4
    build_wan_i2v(root / "wan_i2v"); build_wan_vace(root / "wan_vace")
    build_unet(root / "digits", num_class_embeds=10)  # a generic flow UNet2DModel 1×16×16

Nothing here is a real model: samples are noise-like. Builders import their libraries lazily.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "a photo of a red cube on a table",
    "a blue sphere in the sky at sunset",
    "a cat and a dog playing in the garden",
    "a video of a ball rolling down a hill",
    "a depth map of a room with a chair",
    "green trees, a river, mountains and snow",
] * 4


# ---------------------------------------------------------------------- tokenizers


def clip_tokenizer(directory: Path) -> Any:
    """A CLIP BPE tokenizer trained offline (vocab 300)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|startoftext|>", "<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix="</w>",
        ),
    )
    directory.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(directory))
    return CLIPTokenizer(
        vocab=f"{directory}/vocab.json", merges=f"{directory}/merges.txt", model_max_length=77
    )


def t5_tokenizer() -> Any:
    """A sentencepiece-unigram T5 tokenizer trained offline (vocab 200); also for UMT5."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        CORPUS, vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    vocab = [tuple(v) for v in json.loads(sp.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_text(tokenizer: Any, *, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
    )  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_text(tokenizer: Any, *, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


# ---------------------------------------------------------------------- generic flow models


def build_unet(path: Path, *, num_class_embeds: int | None = None, seed: int = 0) -> Path:
    """A UNet2DModel 1×16×16 (pixels in [-1, 1], t = σ·1000), saved at ``path``."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )  # fmt: skip
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- FLUX


def flux_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def build_flux(
    path: Path,
    *,
    control: bool = False,
    seed: int = 0,
    transformer: Mapping[str, Any] | None = None,
) -> Path:
    """FluxPipeline (or FluxControlPipeline: 128 input channels, latents ‖ control latents)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    config = dict(
        patch_size=1, in_channels=128 if control else 64, out_channels=64, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )  # fmt: skip
    model = FluxTransformer2DModel(**(config | dict(transformer or {})))
    clip_tok = clip_tokenizer(path / "_bpe")
    t5_tok = t5_tokenizer()
    cls = FluxControlPipeline if control else FluxPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=flux_vae(),
        text_encoder=clip_text(clip_tok, projection=False),
        tokenizer=clip_tok,
        text_encoder_2=t5_text(t5_tok),
        tokenizer_2=t5_tok,
        transformer=model,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- SD3


def build_sd3(path: Path, *, seed: int = 0, transformer: Mapping[str, Any] | None = None) -> Path:
    """StableDiffusion3Pipeline: two CLIPs with projection, T5, a 4-channel VAE (×2)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    config = dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4,
    )  # fmt: skip
    model = SD3Transformer2DModel(**(config | dict(transformer or {})))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    clip_tok = clip_tokenizer(path / "_bpe")
    t5_tok = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_text(clip_tok, projection=True),
        tokenizer=clip_tok,
        text_encoder_2=clip_text(clip_tok, projection=True),
        tokenizer_2=clip_tok,
        text_encoder_3=t5_text(t5_tok),
        tokenizer_3=t5_tok,
        transformer=model,
    )
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- Wan


def wan_parts(
    in_channels: int = 16,
    image_dim: int | None = None,
    transformer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    t5_tok = t5_tokenizer()
    return dict(
        transformer=WanTransformer3DModel(**(dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
            num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32, image_dim=image_dim,
        ) | dict(transformer or {}))),
        vae=AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=t5_text(t5_tok, umt5=True),
        tokenizer=t5_tok,
    )  # fmt: skip


def build_wan(path: Path, *, seed: int = 0, transformer: Mapping[str, Any] | None = None) -> Path:
    """WanPipeline (text-to-video): 9 frames of 32×32 → latents (16, 3, 4, 4)."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    WanPipeline(**wan_parts(transformer=transformer)).save_pretrained(path)
    return path


def build_wan_i2v(path: Path, *, seed: int = 0) -> Path:
    """WanImageToVideoPipeline, Wan 2.1 style (CLIP image encoder, 36 input channels)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, intermediate_size=16, patch_size=1,
        )
    ).eval()  # fmt: skip
    processor = CLIPImageProcessor(crop_size=32, size=32)
    parts = wan_parts(in_channels=36, image_dim=4)
    WanImageToVideoPipeline(
        **parts, image_encoder=encoder, image_processor=processor
    ).save_pretrained(path)
    return path


def build_wan_vace(path: Path, *, seed: int = 0) -> Path:
    """WanVACEPipeline: a VACE transformer (control layers 0 and 2, 96 control channels)."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    torch.manual_seed(seed)
    parts = wan_parts()
    parts["transformer"] = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        vace_layers=[0, 2], vace_in_channels=96,
    )  # fmt: skip
    WanVACEPipeline(**parts).save_pretrained(path)
    return path
