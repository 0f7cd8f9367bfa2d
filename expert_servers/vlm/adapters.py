"""``VLMAdapter`` (transformers) and ``VLLMAdapter`` (vLLM): model ids → VQAScore experts.

Both are :class:`~poegen.expert_servers.server.adapter.ModelAdapter`\\ s with zero-argument
constructors (entry points ``vlm`` and ``vllm`` of group ``poegen.backends``). ``load`` reads
the options, loads the backend and returns a :class:`~.reward.VQAReward` whose ``Describe``
says DISCRIMINATIVE with ``pixel_input``.

Shared options: ``max_batch`` (images per backend call, default 8), ``frames`` (video frames
scored, default 8), ``score`` (``yes``: log P(Yes), default; ``yes_no``: log
P(Yes)/(P(Yes)+P(No))), ``name`` (default ``vqascore``). Backend options: see
:mod:`.hf` and :mod:`.vllm_backend`. Unknown options and bad values: INVALID_ARGUMENT on
``options[<name>]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from poegen.expert_servers.server.adapter import ModelRef, Progress, ServedModel
from poegen.expert_servers.vlm import hf
from poegen.expert_servers.vlm.options import OptionReader
from poegen.expert_servers.vlm.reward import RewardOptions, VQAReward
from poegen.kernel.refusal import ExpertError


def reward_options(read: OptionReader) -> RewardOptions:
    """The shared options."""
    return RewardOptions(
        max_batch=read.integer("max_batch", 8, minimum=1),
        frames=read.integer("frames", 8, minimum=1),
        normalize=read.choice("score", "yes", ("yes", "yes_no")) == "yes_no",
        name=read.text("name", "vqascore") or "vqascore",
    )


def source_of(ref: ModelRef) -> str:
    """What ``from_pretrained`` gets: the resolved folder, or the allowlisted hub id."""
    return str(ref.path) if ref.path is not None else ref.model_id


class VLMAdapter:
    """Loads Qwen2-VL, Qwen2.5-VL, LLaVA, PaliGemma (or a text LLM) with transformers."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        read = OptionReader(options)
        shared = reward_options(read)
        dtype, device = read.dtype(), read.device()
        family = read.text("family")
        read.finish()
        if ref.path is not None and not ref.path.is_dir():
            raise ExpertError.invalid("model_id", f"{ref.model_id!r} is not a model folder")
        progress(0.1, "reading the config")
        family = family or _model_type(ref)
        if hf.family_of(family) is None:
            raise ExpertError.invalid(
                "options[family]", f"{family!r} is not one of {list(hf.FAMILIES)}"
            )
        progress(0.3, f"loading a {hf.family_of(family)} model")
        try:
            judge = hf.load_transformers_judge(
                source_of(ref), family=hf.family_of(family) or "", dtype=dtype, device=device
            )
        except OSError:  # no safetensors weights (a pickled checkpoint is never read), no tokenizer
            raise ExpertError.invalid(
                "model_id",
                f"{ref.model_id!r} is not a {family} checkpoint with safetensors weights",
            ) from None
        # a transformers model: one call at a time
        return ServedModel(VQAReward(judge, shared, model_id=ref.model_id), concurrent=False)


class VLLMAdapter:
    """Loads a vLLM engine in this process, or talks to an OpenAI-compatible endpoint."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        from poegen.expert_servers.vlm import vllm_backend

        read = OptionReader(options)
        shared = reward_options(read)
        judge = vllm_backend.load_vllm_judge(source_of(ref), read, progress)
        # an in-process engine takes one call at a time; an endpoint batches what it is sent
        remote = isinstance(judge, vllm_backend.EndpointJudge)
        return ServedModel(VQAReward(judge, shared, model_id=ref.model_id), concurrent=remote)


def _model_type(ref: ModelRef) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source_of(ref), trust_remote_code=False)
    except (OSError, ValueError):
        raise ExpertError.invalid("model_id", f"{ref.model_id!r} has no readable config") from None
    return str(config.model_type)
