"""Questions of a VQAScore reward, read from a ``Condition``.

The convention (one ``Prepare`` per set of questions; the handle answers ``LogProb``):

* ``condition.text`` as plain text is a *prompt*, asked through the VQAScore template
  (Lin et al., "Evaluating text-to-visual generation with image-to-text generation", 2024)::

      Does this figure show "{text}"? Please answer Yes or No.

* ``condition.text`` as JSON (it starts with ``[`` or ``{``) is a list of questions, or one
  question. Each item is a string (a question asked verbatim, weight 1) or an object with
  exactly one of ``"question"`` (verbatim) or ``"prompt"`` (through the template) and an
  optional finite ``"weight"`` (default 1)::

      [{"prompt": "a red cat", "weight": 2}, "Is the cat on a mat? Please answer Yes or No."]

* ``condition.scalars`` may override the model's options for this handle: ``normalize``
  (0: log P(Yes); 1: log P(Yes)/(P(Yes)+P(No))) and ``frames`` (video frames scored, ≥ 1).
* ``condition.tensors`` are not accepted.

The reward of an image is Σ_q w_q·score_q. Errors are ``ExpertError``\\ s naming the field:
``condition.text`` (empty, bad JSON), ``condition.text[i].question`` (empty or not a string),
``condition.text[i].weight`` (not finite), ``condition.scalars[name]``,
``condition.tensors[name]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.refusal import ExpertError

VQASCORE_TEMPLATE = 'Does this figure show "{text}"? Please answer Yes or No.'
MAX_QUESTIONS = 64


@dataclass(frozen=True, slots=True)
class Question:
    """One question asked about every image, and the weight of its score."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Query:
    """What one handle asks: the questions, the score mode and the video frame count."""

    questions: tuple[Question, ...]
    normalize: bool
    frames: int


def vqascore_question(prompt: str) -> str:
    """The VQAScore question for a prompt."""
    return VQASCORE_TEMPLATE.format(text=prompt.strip())


def parse_condition(condition: Condition, *, normalize: bool, frames: int) -> Query:
    """The :class:`Query` of ``condition``; ``normalize`` and ``frames`` are the defaults."""
    for name in condition.tensors:
        raise ExpertError.invalid(f"condition.tensors[{name}]", "a VLM reward takes no tensors")
    for name, value in condition.scalars.items():
        if name == "normalize":
            if value not in (0.0, 1.0):
                raise ExpertError.invalid(f"condition.scalars[{name}]", "must be 0 or 1")
            normalize = bool(value)
        elif name == "frames":
            if value != int(value) or value < 1:
                raise ExpertError.invalid(f"condition.scalars[{name}]", "must be an integer ≥ 1")
            frames = int(value)
        else:
            raise ExpertError.invalid(
                f"condition.scalars[{name}]", "unknown scalar (known: normalize, frames)"
            )
    return Query(parse_questions(condition.text), normalize, frames)


def parse_questions(text: str) -> tuple[Question, ...]:
    """Questions of ``condition.text`` (see the module docstring)."""
    stripped = text.strip()
    if not stripped:
        raise ExpertError.invalid("condition.text", "empty: give a prompt or questions")
    if stripped[0] not in "[{":
        return (Question(vqascore_question(stripped)),)
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        raise ExpertError.invalid("condition.text", f"invalid JSON ({e.msg})") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ExpertError.invalid("condition.text", "empty list of questions")
    if len(items) > MAX_QUESTIONS:
        raise ExpertError.invalid("condition.text", f"more than {MAX_QUESTIONS} questions")
    return tuple(_question(i, item) for i, item in enumerate(items))


def _question(index: int, item: object) -> Question:
    where = f"condition.text[{index}]"
    if isinstance(item, str):
        item = {"question": item}
    if not isinstance(item, dict):
        raise ExpertError.invalid(where, "expected a string or an object")
    unknown = set(item) - {"question", "prompt", "weight"}
    if unknown:
        raise ExpertError.invalid(f"{where}.{sorted(unknown)[0]}", "unknown key")
    if ("question" in item) == ("prompt" in item):
        raise ExpertError.invalid(where, "needs exactly one of 'question' or 'prompt'")
    key = "question" if "question" in item else "prompt"
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise ExpertError.invalid(f"{where}.{key}", "must be a non-empty string")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ExpertError.invalid(f"{where}.weight", "must be a finite number")
    text = value.strip() if key == "question" else vqascore_question(value)
    return Question(text, float(weight))
