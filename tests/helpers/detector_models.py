"""A tiny random-weight zero-shot object detector (OWL-ViT), saved with ``save_pretrained``.

Nothing comes from a hub: the tokenizer is a BPE model trained here (``vlm_models``' corpus and
trainer), the config two towers of one layer of width 32, the weights random under a fixed
seed. The folder loads through ``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``,
the path :class:`poegen.bench.paper_layout.TransformersDetector` takes for a real OWL-ViT.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE, PATCH = 32, 8  # 4×4 patches: 16 box queries


def save_owlvit(path: Path) -> Path:
    """OWL-ViT with a CLIP-style BPE tokenizer and the PIL image processor (no torchvision)."""
    from helpers.vlm_models import make_tokenizer
    from transformers import (
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessorPil,
        OwlViTProcessor,
    )

    tok = make_tokenizer(
        ["<|endoftext|>", "<|startoftext|>", "!"],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="!",  # CLIP's pad token
    )
    config = OwlViTConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
        },
        projection_dim=32,
    )
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = OwlViTProcessor(
        image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tok
    )
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path
