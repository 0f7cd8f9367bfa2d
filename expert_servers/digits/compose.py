"""The three digit compositions of the demo and the benchmark, with their settings.

Shared by ``poegen demo`` (:mod:`poegen.clients.digits_demo`, experts as servers) and
``bench/digits.py`` (experts in process), so both run the same products:

1. **reward**: the all-digits prior × exp(λ·log p("three" | x̂_0)) from the reward classifier
   (pixel input: the kernel reads it clamp((x̂_0 + 1)/2, 0, 1)). With λ = 1 the target would
   be the prior's posterior given the label, p(x | 3) ∝ p(x)·p(3 | x); λ = 3 sharpens it to
   confident threes. Resample-move with one small ULA step per level (c = 0.2): the moves
   rejuvenate the resampled copies (distinct samples) without leaving the reward's modes.
2. **product**: the {0–4} prior × the even-digit prior, p_a(x)·p_b(x): mass where both put
   mass, i.e. on {0, 2, 4}. The Euler transition follows the averaged velocity, and ULA moves
   on the summed scores (``mcmc_steps`` per level: 5 in the benchmark, 3 in the demo) correct
   toward the product.
3. **completion**: the all-digits prior × a masked-target constraint
   (:class:`poegen.expert_servers.masked.MaskedTarget`) tying the left half (columns 0–7) to a
   held-out digit: at every level the left half of x_σ is replaced by the noised target
   (x' = (1−m)⊙x + m⊙((1−σ)·x_ref + σ·ε)), and the Gaussian tie −(w/2)·‖m⊙(x̂_0 − x_ref)‖²
   weighs the particles, so the right half becomes what fits the fixed left half.

Settings are in :func:`settings` (``scale`` shrinks the particle counts for quick runs); the
numbers were tuned on the benchmark (see ``docs/digits.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from poegen.expert_servers.digits import held_out_indices, model_path
from poegen.kernel.experts import ExpertInfo
from poegen.kernel.spec import Factor, SamplerSettings

SAMPLE_SHAPE = (1, 16, 16)
TARGET_DIGIT = 3
TARGET_LABEL = "three"
REWARD_WEIGHT = 3.0
REWARD_STEP = 0.2
PRODUCT_DIGITS = (0, 2, 4)
TIE_WEIGHT = 4.0
COMPLETION_STEP = 0.3


@dataclass(frozen=True)
class Experts:
    """The shipped models as in-process experts.

    Attributes:
        flows: ``flow-all``, ``flow-0to4``, ``flow-even`` (generative, pixels in [-1, 1]).
        reward: the reward classifier, unprepared (``prepare`` a label).
        judge: the judge classifier (benchmark only).
    """

    flows: Mapping[str, Any]
    reward: Any
    judge: Any


def load_experts(device: str = "cpu") -> Experts:
    """Load the shipped models through the generic flow and classifier adapters."""
    from poegen.expert_servers.classifier import ClassifierAdapter
    from poegen.expert_servers.flow import FlowAdapter
    from poegen.expert_servers.server.adapter import ModelRef

    def load(adapter: Any, name: str) -> Any:
        ref = ModelRef(name, model_path(name))
        return adapter.load(ref, {"device": device}, lambda f, m: None).expert

    flows = {n: load(FlowAdapter(), n) for n in ("flow-all", "flow-0to4", "flow-even")}
    classifier = ClassifierAdapter()
    return Experts(
        flows, load(classifier, "classifier-reward"), load(classifier, "classifier-judge")
    )


def load_judge(device: str = "cpu") -> Any:
    """The judge classifier alone (unprepared; ``log_probs(pixels)`` gives every class)."""
    from poegen.expert_servers.classifier import ClassifierAdapter
    from poegen.expert_servers.server.adapter import ModelRef

    ref = ModelRef("classifier-judge", model_path("classifier-judge"))
    return ClassifierAdapter().load(ref, {"device": device}, lambda f, m: None).expert


def to_pixels(x0: Tensor) -> Tensor:
    """Clean estimates in [-1, 1] → pixels in [0, 1] (what the kernel gives pixel rewards)."""
    return ((x0 + 1) / 2).clamp(0, 1)


class OnLatents:
    """A pixel-input potential that reads x̂_0 itself (pixel-space priors): for callers that
    score samples outside the kernel, like best-of-k."""

    def __init__(self, expert: Any) -> None:
        self.expert = expert

    def describe(self) -> ExpertInfo:
        return replace(self.expert.describe(), pixel_input=False)

    def log_potential(self, x0: Tensor) -> Tensor:
        return self.expert.log_potential(to_pixels(x0))


def on_latents(factor: Factor) -> Factor:
    if not factor.expert.describe().pixel_input:
        return factor
    return replace(factor, expert=OnLatents(factor.expert))


def reward_factors(experts: Experts, weight: float = REWARD_WEIGHT) -> tuple[Factor, ...]:
    from poegen.expert_servers.server.adapter import Condition

    is_three = experts.reward.prepare(Condition(text=TARGET_LABEL))
    return (
        Factor(experts.flows["flow-all"], name="prior"),
        Factor(is_three, weight=weight, name=f"is-{TARGET_LABEL}"),
    )


def product_factors(experts: Experts) -> tuple[Factor, ...]:
    return (
        Factor(experts.flows["flow-0to4"], name="digits-0to4"),
        Factor(experts.flows["flow-even"], name="digits-even"),
    )


def left_half_mask() -> Tensor:
    """1 on columns 0–7 of a 1×16×16 sample, 0 elsewhere."""
    mask = torch.zeros(SAMPLE_SHAPE)
    mask[..., : SAMPLE_SHAPE[-1] // 2] = 1
    return mask


def completion_factors(experts: Experts, target: Tensor) -> tuple[Factor, ...]:
    from poegen.expert_servers.masked import MaskedTarget

    tie = MaskedTarget(target, left_half_mask(), TIE_WEIGHT, name="left-half")
    return (Factor(experts.flows["flow-all"], name="prior"), Factor(tie, name="left-half"))


def held_out(count: int) -> tuple[Tensor, Tensor]:
    """``count`` held-out digits (x0 in [-1, 1], ``(count, 1, 16, 16)``) and their labels,
    cycling through the classes 0, 1, …, 9 in order of the held-out indices."""
    from poegen.expert_servers.digits.data import load_digits16

    digits = load_digits16()
    idx = torch.tensor(held_out_indices())
    labels = digits.labels[idx]
    chosen: list[int] = []
    seen = {c: 0 for c in range(10)}
    while len(chosen) < count:
        c = len(chosen) % 10
        matches = idx[labels == c]
        chosen.append(int(matches[seen[c] % len(matches)]))
        seen[c] += 1
    picked = torch.tensor(chosen)
    return digits.x0[picked], digits.labels[picked]


def settings(scale: float = 1.0) -> dict[str, SamplerSettings]:
    """Each composition's settings; ``scale`` multiplies the particle counts."""

    def n(count: int) -> int:
        return max(4, int(count * scale))

    return {
        "reward": SamplerSettings(
            num_particles=n(128), num_steps=20, mcmc_steps=1, step_size=REWARD_STEP
        ),
        "product": SamplerSettings(num_particles=n(128), num_steps=20, mcmc_steps=5),
        "completion": SamplerSettings(
            num_particles=n(16), num_steps=16, mcmc_steps=1, step_size=COMPLETION_STEP
        ),
    }
