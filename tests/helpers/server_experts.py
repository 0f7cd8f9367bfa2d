"""Small real experts for the server tests (exact formulas, optional fixed compute delay).

``Gaussian``: the data distribution N(μ, s²·I) on the rectified-flow path, for which every
quantity is exact: with x_σ = (1−σ)·x_0 + σ·ε, x_σ ~ N((1−σ)·μ, ((1−σ)²s² + σ²)·I), and

    v(x_σ, σ) = E[ε − x_0 | x_σ] = (σ − (1−σ)·s²)/var · (x_σ − (1−σ)·μ) − μ.

It answers ``log_prob``, and ``prepare`` gives a view with the mean shifted by the scalar
``shift`` of the condition. ``delay_s`` sleeps in every call (a stand-in for GPU time).
``LinearReward`` (discriminative) and ``HalfSpace`` (constraint with ``project``) are the
other kinds.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import yaml
from torch import Tensor

from poegen.expert_servers.server import Condition, ModelRef, ServedModel
from poegen.expert_servers.server.adapter import Progress
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind


class Gaussian:
    def __init__(
        self,
        mean: list[float] | tuple[float, ...] = (0.0, 0.0),
        std: float = 1.0,
        *,
        delay_s: float = 0.0,
        max_batch: int | None = 64,
        name: str = "gaussian",
    ) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = float(std)
        self.delay_s = delay_s
        self.max_batch = max_batch
        self.name = name

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name=self.name,
            kind=ExpertKind.GENERATIVE,
            capabilities=frozenset({Capability.LOG_PROB}),
            sample_shape=tuple(self.mean.shape),
            max_batch=self.max_batch,
        )

    def _moments(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * self.std**2 + s**2
        return s, var, x.to(torch.float64) - (1 - s) * self.mean

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        s, var, centred = self._moments(x, sigma)
        return ((s - (1 - s) * self.std**2) / var * centred - self.mean).to(x.dtype)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        _, var, centred = self._moments(x, sigma)
        d = centred[0].numel()
        sq = centred.flatten(1).pow(2).sum(1)
        return -sq / (2 * var.flatten()) - d / 2 * torch.log(2 * math.pi * var.flatten())

    def prepare(self, condition: Condition) -> Gaussian:
        unknown = set(condition.scalars) - {"shift"}
        if unknown or condition.tensors:
            raise ExpertError.invalid("condition", "only the scalar 'shift' is accepted")
        shift = condition.scalars.get("shift", 0.0)
        return Gaussian(
            (self.mean + shift).tolist(),
            self.std,
            delay_s=self.delay_s,
            max_batch=self.max_batch,
            name=self.name,
        )


class LinearReward:
    """r(x0) = ⟨a, x0⟩."""

    def __init__(self, a: list[float] | tuple[float, ...] = (1.0, 0.0)) -> None:
        self.a = torch.as_tensor(a, dtype=torch.float64)

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name="linear", kind=ExpertKind.DISCRIMINATIVE, sample_shape=tuple(self.a.shape)
        )

    def log_potential(self, x0: Tensor) -> Tensor:
        return x0.to(torch.float64).flatten(1) @ self.a


class HalfSpace:
    """1[x_0 ≥ 0]; projects x_σ onto x ≥ 0 coordinate-wise."""

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name="half_space",
            kind=ExpertKind.CONSTRAINT,
            capabilities=frozenset({Capability.PROJECT}),
            sample_shape=(2,),
        )

    def log_potential(self, x0: Tensor) -> Tensor:
        inside = (x0 >= 0).flatten(1).all(1)
        return torch.where(inside, 0.0, -math.inf).to(torch.float32)

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x.clamp(min=0)


class GaussianFileAdapter:
    """Loads ``Gaussian`` experts from YAML files ``{mean: [...], std: s, delay_s: t}``.

    Counts its loads, can sleep in ``load`` (``load_delay_s``), reports progress, and fails
    with a message holding the file's path when the file says ``fail: true`` (the host must
    not pass that message on).
    """

    def __init__(self, load_delay_s: float = 0.0) -> None:
        self.load_delay_s = load_delay_s
        self.loads = 0
        self.refs: list[Any] = []

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        self.loads += 1
        assert ref.path is not None
        spec = yaml.safe_load(ref.path.read_text())
        progress(0.25, "read the file")
        time.sleep(self.load_delay_s)
        if spec.get("fail"):
            raise RuntimeError(f"cannot open weights at {ref.path}")
        progress(0.75, "built")
        expert = Gaussian(spec["mean"], spec.get("std", 1.0), delay_s=spec.get("delay_s", 0.0))
        self.refs.append(weakref.ref(expert))
        return ServedModel(expert, latent_space="toy-2d")
