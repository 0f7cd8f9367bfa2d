"""VQAScore-style reward experts: the probability that a VLM answers "Yes" about an image.

A discriminative expert with ``pixel_input``: ``Prepare`` takes questions (or a prompt, asked
as 'Does this figure show "{text}"? Please answer Yes or No.'; see :mod:`.questions`),
``LogProb`` takes decoded pixels in [0, 1] (images or videos) and answers, per sample,
Σ_q w_q·log P(Yes | image, q) (or the normalised log P(Yes)/(P(Yes)+P(No))).

Backends (entry points of group ``poegen.backends``):

* ``vlm`` → :class:`VLMAdapter`: transformers in this process (Qwen2-VL, Qwen2.5-VL, LLaVA,
  PaliGemma), :mod:`.hf`.
* ``vllm`` → :class:`VLLMAdapter`: an in-process ``vllm.LLM`` engine, or any OpenAI-compatible
  endpoint (option ``endpoint=http://HOST:PORT/v1``), :mod:`.vllm_backend`. Runs in its own
  environment (``scripts/setup_vllm.sh``), as a separately deployed service.

Serve one with ``poegen serve vlm --model DIR [--option dtype=bfloat16 …]`` (or ``vllm``; the
engine needs the environment of ``scripts/setup_vllm.sh``).

Modules: ``questions`` (condition → questions), ``scoring`` (distribution → log P(Yes)),
``reward`` (the expert and its views; pixels → images), ``hf``, ``vllm_backend``, ``adapters``,
``options``. See docs/vlm.md.
"""

from poegen.expert_servers.vlm.adapters import VLLMAdapter, VLMAdapter
from poegen.expert_servers.vlm.questions import VQASCORE_TEMPLATE, Query, Question
from poegen.expert_servers.vlm.reward import RewardOptions, VQAReward, VQAView

__all__ = [
    "VQASCORE_TEMPLATE",
    "Query",
    "Question",
    "RewardOptions",
    "VLLMAdapter",
    "VLMAdapter",
    "VQAReward",
    "VQAView",
]
