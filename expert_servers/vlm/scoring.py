"""From a VLM's next-token distribution to log P(Yes), the same way for every backend.

The answer is the first token the model would generate after the prompt. A *yes token* is any
token whose text, stripped of white space and of ``.,!?:;"'`` and lower-cased, is ``yes``
("Yes", " yes", "YES", "▁Yes" …); likewise *no tokens*. Then::

    log P(Yes) = logsumexp_{t yes} log p(t)
    normalised: log P(Yes)/(P(Yes)+P(No)) = log P(Yes) − logaddexp(log P(Yes), log P(No))

* Full distributions (transformers): the sums run over the whole vocabulary, exactly.
* Top-k lists (vLLM's ``logprobs``, an OpenAI endpoint's ``top_logprobs``): the sums run over
  the listed tokens only, so the value is a **lower bound** of P(Yes), exact when every yes
  token is listed (k ≥ vocabulary size). When no yes token is listed, the bound would be 0;
  we report log p_k instead, the smallest listed log-probability: every unlisted token has at
  most p_k, so this is an upper bound for any one yes token, and the true P(Yes) lies in
  [0, n_yes·p_k]. It keeps the reward finite and below every listed answer; raise k to
  tighten it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_STRIP = string.whitespace + ".,!?:;\"'"


def answer_word(token_text: str) -> str:
    """``" Yes."`` → ``"yes"``; SentencePiece's ``▁`` and byte-level ``Ġ`` count as spaces."""
    return token_text.replace("▁", " ").replace("Ġ", " ").strip(_STRIP).lower()


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the tokenizer's yes tokens and no tokens (decoding each id of the vocabulary)."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    yes = [i for i, t in enumerate(texts) if answer_word(t) == "yes"]
    no = [i for i, t in enumerate(texts) if answer_word(t) == "no"]
    if not yes or not no:
        raise ValueError("the tokenizer has no 'yes' or no 'no' token")
    return yes, no


def from_logits(logits: Tensor, yes: Sequence[int], no: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(log P(Yes), log P(No)), each ``(B,)`` float64, from next-token logits ``(B, V)``."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    yes_ids = torch.as_tensor(yes, device=logits.device)
    no_ids = torch.as_tensor(no, device=logits.device)
    return log_p[:, yes_ids].logsumexp(-1).cpu(), log_p[:, no_ids].logsumexp(-1).cpu()


def from_top(top: Iterable[tuple[str, float]]) -> tuple[float, float]:
    """(log P(Yes), log P(No)) bounds from a top-k list of (token text, log-probability)."""
    listed = [(answer_word(text), lp) for text, lp in top if math.isfinite(lp)]
    if not listed:
        raise ValueError("no finite log-probability listed")
    floor = min(lp for _, lp in listed)

    def total(word: str) -> float:
        values = [lp for w, lp in listed if w == word]
        return float(torch.tensor(values, dtype=torch.float64).logsumexp(0)) if values else floor

    return total("yes"), total("no")


def score(log_yes: Tensor, log_no: Tensor, *, normalize: bool) -> Tensor:
    """log P(Yes), or log P(Yes)/(P(Yes)+P(No)) when ``normalize``."""
    if not normalize:
        return log_yes
    return log_yes - torch.logaddexp(log_yes, log_no)
