"""The transformers backend: a VLM in this process, one forward pass per chunk of images.

Families, chosen by the checkpoint's ``config.model_type`` (or the ``family`` option):

==============  ==========================================  ===================================
family          model class                                 inputs
==============  ==========================================  ===================================
``llava``       ``LlavaForConditionalGeneration``           ``AutoProcessor`` (text + images)
``paligemma``   ``PaliGemmaForConditionalGeneration``       ``AutoProcessor``; the question is
                                                            the prefix, the answer comes next
``qwen2_vl``    ``Qwen2VLForConditionalGeneration``         ``Qwen2VLImageProcessorPil`` +
``qwen2_5_vl``  ``Qwen2_5_VLForConditionalGeneration``      tokenizer (see below)
``text``        ``AutoModelForCausalLM``                    tokenizer only: the image is *not*
                                                            shown (for the logprob mechanics and
                                                            the transformers/vLLM agreement)
==============  ==========================================  ===================================

The prompt is what the model's chat template renders for one user turn
``[image, question]`` with the generation prompt, when the processor or tokenizer has a
template; otherwise the family's documented format (LLaVA-1.5 ``"USER: <image>\\n{q}
ASSISTANT:"``, Qwen's ``<|im_start|>`` turns). The answer distribution is the softmax of the
logits at the last prompt position (:mod:`.scoring`).

Qwen2-VL's HF processor needs torchvision (its video processor), which cannot sit beside the
CPU torch here, so this backend calls the PIL image processor itself and expands each
``<|image_pad|>`` to ``prod(image_grid_thw) / merge_size²`` tokens, as the processor would.

All images of one call share one size, so every row of a batch has the same prompt length: no
padding, and a row's score does not depend on its neighbours (up to kernel reductions).

Options: ``dtype`` (float32 | bfloat16 | float16), ``device`` (a torch device, default cpu),
``family``, plus the shared ones of :class:`~.reward.RewardOptions`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from poegen.expert_servers.vlm import scoring

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "paligemma", "qwen2_vl", "qwen2_5_vl", "text")
_QWEN = ("qwen2_vl", "qwen2_5_vl")
_DEFAULT_PROMPTS = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "text": "USER: {question}\nASSISTANT:",
}


def family_of(model_type: str) -> str | None:
    """The family of a ``config.model_type``; text LLMs map to ``"text"``; None: unsupported."""
    if model_type in FAMILIES:
        return model_type
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "text" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def user_turn(question: str, *, image: bool) -> list[dict[str, Any]]:
    """One user message: the image (when shown) then the question."""
    if not image:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@dataclass
class TransformersJudge:
    """A loaded VLM answering yes/no questions (the :class:`~.reward.Judge` of transformers).

    Attributes:
        family: one of :data:`FAMILIES`.
        model: the ``*ForConditionalGeneration`` / ``*ForCausalLM`` module, in eval mode.
        tokenizer: its tokenizer.
        processor: the multimodal processor (LLaVA, PaliGemma) or the image processor (Qwen);
            ``None`` for text models.
        yes, no: the answer token ids (:func:`.scoring.yes_no_token_ids`).
        device: where the model runs.
    """

    family: str
    model: Any
    tokenizer: Any
    processor: Any
    yes: list[int]
    no: list[int]
    device: torch.device
    lock: threading.Lock

    @torch.inference_mode()
    def answer(self, images: Sequence[Image.Image], question: str) -> tuple[Tensor, Tensor]:
        dtype = self.model.dtype
        inputs = {
            k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in self.inputs(images, question).items()
        }
        with self.lock:  # one forward at a time: the host's worker threads share the model
            logits = self.model(**inputs).logits[:, -1]
        return scoring.from_logits(logits, self.yes, self.no)

    def prompt(self, question: str) -> str:
        """The prompt text for one question (the chat template's rendering, or the default)."""
        owner = self.processor if self.family in ("llava",) else self.tokenizer
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(
                user_turn(question, image=self.family != "text"),
                add_generation_prompt=True,
                tokenize=False,
            )
        key = "qwen" if self.family in _QWEN else self.family
        return _DEFAULT_PROMPTS.get(key, "{question}").format(question=question)

    def inputs(self, images: Sequence[Image.Image], question: str) -> dict[str, Tensor]:
        """Model inputs for each image with the same question (a batch of ``len(images)``)."""
        n = len(images)
        match self.family:
            case "llava":
                return dict(
                    self.processor(
                        text=[self.prompt(question)] * n, images=list(images), return_tensors="pt"
                    )
                )
            case "paligemma":
                # the processor expands <image>, adds <bos> and ends the prefix with "\n"
                text = ["<image>" + question] * n
                out = self.processor(text=text, images=list(images), return_tensors="pt")
                return {k: v for k, v in out.items() if k != "labels"}
            case "qwen2_vl" | "qwen2_5_vl":
                return self._qwen_inputs(images, question)
            case _:
                return self._tokens([self.prompt(question)] * n)

    def _tokens(self, prompts: list[str]) -> dict[str, Tensor]:
        # a chat template writes its own special tokens (bos); the defaults need the tokenizer's
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return dict(self.tokenizer(prompts, return_tensors="pt", add_special_tokens=not templated))

    def _qwen_inputs(self, images: Sequence[Image.Image], question: str) -> dict[str, Tensor]:
        vision = self.processor(images=list(images), return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = int(getattr(self.processor, "merge_size", 2))
        count = int(grid[0].prod()) // (merge * merge)
        if not bool((grid == grid[0]).all()):
            raise ValueError("images of one call must share one size")
        text = self.prompt(question).replace("<|image_pad|>", "<|image_pad|>" * count, 1)
        tokens = self._tokens([text] * len(images))
        pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        tokens["mm_token_type_ids"] = (tokens["input_ids"] == pad_id).long()
        return {**tokens, "pixel_values": vision["pixel_values"], "image_grid_thw": grid}


def load_transformers_judge(
    source: str, *, family: str, dtype: torch.dtype, device: torch.device
) -> TransformersJudge:
    """Load the model, tokenizer and processor of ``source`` (a folder or a hub id)."""
    import transformers

    classes = {
        "llava": transformers.LlavaForConditionalGeneration,
        "paligemma": transformers.PaliGemmaForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "text": transformers.AutoModelForCausalLM,
    }
    model = classes[family].from_pretrained(
        source, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    model = model.to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    processor: Any = None
    if family in ("llava", "paligemma"):
        processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=False)
        tokenizer = processor.tokenizer
    elif family in _QWEN:
        processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(source)
    yes, no = scoring.yes_no_token_ids(tokenizer)
    logger.info("loaded %s (%s): %d yes and %d no tokens", source, family, len(yes), len(no))
    return TransformersJudge(family, model, tokenizer, processor, yes, no, device, threading.Lock())
