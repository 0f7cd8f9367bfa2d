"""The vLLM backend: an in-process ``vllm.LLM`` engine, or any OpenAI-compatible endpoint.

Both ask one chat turn per image, ``[image, question]`` (or the question alone for a text-only
model), with ``max_tokens=1``, greedy, and read the log-probabilities of the first answer
token (:mod:`.scoring`).

**Engine** (no ``endpoint`` option): ``vllm.LLM(model=…)`` in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), called through ``LLM.chat`` (the model's
chat template, images as data URLs) under a lock (the engine is not thread-safe). With
``answers=ids`` (the default when the tokenizer has at most 128 yes/no tokens) the engine
returns the log-probabilities of exactly the yes and no token ids
(``SamplingParams.logprob_token_ids``): P(Yes) is exact. With ``answers=top`` it reads the
``top_logprobs`` most likely tokens and sums those that read "yes" (a lower bound; see
:mod:`.scoring` for the value when none is listed).

**Endpoint** (``endpoint=http://HOST:PORT/v1``): ``POST {endpoint}/chat/completions`` with
``max_tokens=1``, ``temperature=0``, ``logprobs=true``, ``top_logprobs=k`` and images inlined as
PNG data URLs; one request per image, ``concurrency`` at a time. P(Yes) sums the listed tokens
that read "yes": a lower bound of the true P(Yes), exact when k covers the vocabulary
(``top_logprobs=-1`` on a vLLM server started with ``--max-logprobs -1``). The served model
name is ``served_model`` or the first of ``GET {endpoint}/models``. An API key, if the
endpoint wants one, comes from the environment variable named by ``api_key_env``.

Endpoint failures are ExpertErrors on field ``endpoint`` naming the URL: no answer within
``timeout_s`` → DEADLINE_EXCEEDED; unreachable or HTTP 5xx → UNAVAILABLE; HTTP 4xx, or an
answer without logprobs → FAILED_PRECONDITION. The server keeps serving.

Options: ``endpoint``, ``served_model``, ``timeout_s`` (default 30), ``concurrency`` (8),
``api_key_env``; engine: ``dtype`` (float32 | bfloat16 | float16), ``max_model_len`` (0: the
model's), ``max_num_seqs`` (0: ``max_batch``), ``kv_cache_gib`` (CPU KV cache, sets
``VLLM_CPU_KVCACHE_SPACE`` when unset), ``gpu_memory_utilization`` (0.9), ``enforce_eager``
(true), ``seed`` (0), ``answers`` (ids | top); both: ``top_logprobs`` (20; −1: all), ``images``
(auto | true | false: whether the model is shown the image; auto asks the engine, and is true
for an endpoint).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from PIL import Image
from torch import Tensor

from poegen.expert_servers.server.adapter import Progress
from poegen.expert_servers.vlm import scoring
from poegen.expert_servers.vlm.options import OptionReader
from poegen.kernel.refusal import ExpertError

logger = logging.getLogger(__name__)

MAX_ANSWER_IDS = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS


def data_url(image: Image.Image) -> str:
    """A PNG data URL (lossless: the model sees the same 8-bit pixels as transformers)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_turn(question: str, image: Image.Image | None) -> list[dict[str, Any]]:
    """One user message, OpenAI style: the image (if any) then the question."""
    if image is None:
        return [{"role": "user", "content": question}]
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": question},
    ]
    return [{"role": "user", "content": parts}]


def _stack(pairs: Sequence[tuple[float, float]]) -> tuple[Tensor, Tensor]:
    t = torch.tensor(pairs, dtype=torch.float64).reshape(-1, 2)
    return t[:, 0], t[:, 1]


@dataclass
class VLLMEngineJudge:
    """``vllm.LLM`` in this process (the :class:`~.reward.Judge` of the engine)."""

    llm: Any
    yes: list[int]
    no: list[int]
    by_ids: bool
    top_logprobs: int
    images: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, images: Sequence[Image.Image], question: str) -> tuple[Tensor, Tensor]:
        from vllm import SamplingParams

        ids = self.yes + self.no
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(ids) if self.by_ids else self.top_logprobs,
            logprob_token_ids=ids if self.by_ids else None,
        )
        turns = [chat_turn(question, img if self.images else None) for img in images]
        with self.lock:
            outputs = self.llm.chat(turns, params, use_tqdm=False)
        return _stack([self._read(out.outputs[0].logprobs[0]) for out in outputs])

    def _read(self, listed: Mapping[int, Any]) -> tuple[float, float]:
        if not self.by_ids:
            return scoring.from_top((lp.decoded_token or "", lp.logprob) for lp in listed.values())

        def total(ids: list[int]) -> float:
            values = torch.tensor([listed[i].logprob for i in ids], dtype=torch.float64)
            return float(values.logsumexp(0))

        return total(self.yes), total(self.no)


@dataclass
class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint (the :class:`~.reward.Judge` of HTTP)."""

    endpoint: str
    model: str
    top_logprobs: int
    images: bool
    client: httpx.Client
    pool: ThreadPoolExecutor

    def answer(self, images: Sequence[Image.Image], question: str) -> tuple[Tensor, Tensor]:
        turns = [chat_turn(question, img if self.images else None) for img in images]
        return _stack(list(self.pool.map(self.ask, turns)))

    def ask(self, messages: list[dict[str, Any]]) -> tuple[float, float]:
        """(log P(Yes), log P(No)) bounds of one chat turn."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        reply = self._post(body)
        try:
            listed = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            top = [(str(t["token"]), float(t["logprob"])) for t in listed]
            return scoring.from_top(top)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ExpertError.failed_precondition(
                "endpoint",
                f"{self.endpoint} answered without top_logprobs for the first token "
                "(does it support logprobs on chat completions?)",
            ) from None

    def _post(self, body: dict[str, Any]) -> Any:
        try:
            response = self.client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise ExpertError.deadline_exceeded(
                "endpoint", f"{self.endpoint} did not answer within {self.client.timeout.read} s"
            ) from None
        except httpx.HTTPError as e:
            raise ExpertError.unavailable(
                "endpoint", f"{self.endpoint} unreachable ({type(e).__name__})"
            ) from None
        if response.status_code >= 500:
            raise ExpertError.unavailable(
                "endpoint", f"{self.endpoint} answered HTTP {response.status_code}"
            )
        if response.status_code != 200:
            raise ExpertError.failed_precondition(
                "endpoint",
                f"{self.endpoint} answered HTTP {response.status_code}: {response.text[:200]}",
            )
        try:
            return response.json()
        except ValueError:
            raise ExpertError.failed_precondition(
                "endpoint", f"{self.endpoint} answered something other than JSON"
            ) from None


def load_vllm_judge(
    source: str, read: OptionReader, progress: Progress
) -> VLLMEngineJudge | EndpointJudge:
    """The engine for ``source``, or the endpoint client when ``endpoint`` is given."""
    endpoint = read.text("endpoint")
    top = read.integer("top_logprobs", 20, minimum=-1)
    if top == 0:
        raise ExpertError.invalid("options[top_logprobs]", "must be ≥ 1, or −1 for all")
    images = read.choice("images", "auto", ("auto", "true", "false"))
    if endpoint:
        return _load_endpoint(endpoint, source, read, top, images != "false", progress)
    return _load_engine(source, read, top, images, progress)


def _load_endpoint(
    endpoint: str, source: str, read: OptionReader, top: int, images: bool, progress: Progress
) -> EndpointJudge:
    if not endpoint.startswith(("http://", "https://")):
        raise ExpertError.invalid("options[endpoint]", "must be an http(s):// URL")
    model = read.text("served_model")
    timeout = read.number("timeout_s", 30.0, minimum=0.001)
    concurrency = read.integer("concurrency", 8, minimum=1)
    key_env = read.text("api_key_env")
    read.finish()
    headers = {}
    if key_env:
        if not os.environ.get(key_env):
            raise ExpertError.invalid("options[api_key_env]", f"${key_env} is not set")
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    base = endpoint.rstrip("/")
    client = httpx.Client(base_url=base, timeout=timeout, headers=headers)
    progress(0.5, "asking the endpoint for its models")
    if not model:
        try:
            response = client.get("/models")
            response.raise_for_status()
            model = str(response.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as e:
            client.close()
            raise ExpertError.unavailable(
                "options[endpoint]", f"{base}/models did not list a model ({type(e).__name__})"
            ) from None
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="poegen-vlm-endpoint")
    logger.info("VQAScore via %s, model %s, top_logprobs %d", base, model, top)
    return EndpointJudge(base, model or source, top, images, client, pool)


def _load_engine(
    source: str, read: OptionReader, top: int, images: str, progress: Progress
) -> VLLMEngineJudge:
    dtype = read.choice("dtype", "float32", ("float32", "bfloat16", "float16"))
    max_model_len = read.integer("max_model_len", 0, minimum=0)
    max_num_seqs = read.integer("max_num_seqs", 0, minimum=0)
    kv_cache_gib = read.number("kv_cache_gib", 1.0, minimum=0.001)
    gpu_memory = read.number("gpu_memory_utilization", 0.9, minimum=0.01)
    eager = read.flag("enforce_eager", True)
    seed = read.integer("seed", 0, minimum=0)
    answers = read.choice("answers", "auto", ("auto", "ids", "top"))
    max_batch = read.integer("max_batch", 8, minimum=1)  # already read by the adapter
    read.finish()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_cache_gib))))
    from vllm import LLM

    progress(0.2, "starting the vLLM engine")
    engine_args: dict[str, Any] = {
        "model": source,
        "dtype": dtype,
        "enforce_eager": eager,
        "max_num_seqs": max_num_seqs or max_batch,
        "max_logprobs": -1,
        "seed": seed,
        "gpu_memory_utilization": gpu_memory,
        "trust_remote_code": False,
        "load_format": "safetensors",  # never a pickled checkpoint
    }
    if max_model_len:
        engine_args["max_model_len"] = max_model_len
    llm = LLM(**engine_args)
    yes, no = scoring.yes_no_token_ids(llm.get_tokenizer())
    by_ids = answers == "ids" or (answers == "auto" and len(yes) + len(no) <= MAX_ANSWER_IDS)
    if by_ids and len(yes) + len(no) > MAX_ANSWER_IDS:
        raise ExpertError.invalid(
            "options[answers]", f"{len(yes) + len(no)} yes/no tokens, over vLLM's {MAX_ANSWER_IDS}"
        )
    shown = images == "true" or (
        images == "auto" and bool(llm.llm_engine.model_config.is_multimodal_model)
    )
    logger.info("vLLM engine for %s: answers by %s, images %s", source, by_ids, shown)
    return VLLMEngineJudge(llm, yes, no, by_ids, top, shown)
