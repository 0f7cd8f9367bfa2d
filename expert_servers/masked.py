"""A constraint expert that ties a masked region of the sample to a target.

Given a target x_ref (the sample shape S: latents or pixels), a mask m (S or broadcastable to
it, values in [0, 1]) and a weight w, :class:`MaskedTarget` is a constraint expert with

* **propose** (capability ``PROPOSE``): at level σ, replace the masked region of x_σ by the
  noised target, fresh noise per call::

      x' = (1 − m)⊙x + m⊙((1 − σ)·x_ref + σ·ε),   ε ~ N(0, I) from torch.Generator(seed)

  This is the "replace" step of inpainting samplers (RePaint, SDEdit-style blending): the
  masked coordinates of x' are an exact draw of the forward path x_σ | x_0 = x_ref. The
  kernel's ``seed`` (drawn from the job's generator) is the only randomness, drawn on the CPU
  in float32 and moved to x's device, so a job reproduces across devices.
* **project** (capability ``PROJECT``): the deterministic variant. The implied noise of x in
  the mask, ε̂ = (x − (1 − σ)·x_ref)/σ, is rescaled to the norm a standard normal has on
  the mask (‖ε̂‖² = n, n the number of masked coordinates), i.e. x_σ is projected radially onto
  the typical shell of N((1 − σ)·x_ref, σ²·I) around the noised target. Idempotent; keeps the
  particle's own noise direction (so its high-frequency content) instead of drawing new noise;
  as σ → 0 it pins the region to x_ref. Where ε̂ = 0 (x sits exactly on (1 − σ)·x_ref) x is
  returned unchanged in the mask's interior direction (there is no direction to keep).
  Soft masks blend: x' = (1 − m)⊙x + m⊙P(x).
* **log_potential** (a soft constraint on the clean estimate; always ≤ 0)::

      φ(x0) = −(w/2)·‖m⊙(x0 − x_ref)‖²,     ∇_{x0} φ = −w·m²⊙(x0 − x_ref)

  i.e. a Gaussian likelihood x_ref | x0 ~ N(x0, I/w) restricted to the mask.

How the kernel uses these (``poegen.kernel.sampler``): at every level, after the Euler
transition, ``propose`` then ``project`` run on all particles (in factor order); then
``log_potential(x̂_0)`` times the factor's weight enters φ_k, hence the SMC weights, and the
MCMC moves see it only through the *potential stage* (a second accept test on
exp(φ_k(x̂_0') − φ_k(x̂_0)); ``mcmc_rewards=True``). With ``score=True`` the expert instead
announces ``SCORE`` and ``LOG_PROB`` and the tie acts *inside* the MCMC moves: the sampler adds
w·:meth:`MaskedTarget.score` (the exact score of the tie noised to the level, below) to the
summed generative score of every move, w·:meth:`log_prob` to the MALA/HMC log-density, and no
longer uses the log-potential (which would count the tie twice).

The tie noised to level σ: with x_σ = (1 − σ)·x_0 + σ·ε and a flat prior on x_0, the Gaussian
factor on x_0 becomes, on the masked coordinates (binary mask),
x_σ ~ N((1 − σ)·x_ref, ((1 − σ)²/w + σ²)·I), whose score is exact::

      ∇_{x_σ} log q_σ(x_σ) = −m⊙(x_σ − (1 − σ)·x_ref) / ((1 − σ)²/w + σ²)

(:meth:`score`, :meth:`log_prob`); with ``score=True`` the sampler sums it into the MCMC
target as it sums generative scores.

Sample shapes: ``target`` has shape S; inputs are ``(B, *S)``; outputs follow x's dtype and
device. Registered in ``poegen.experts`` as ``masked_target`` (YAML: ``target`` and ``mask``
as nested lists).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind
from poegen.kernel.refusal import ExpertError

__all__ = ["MaskedTarget", "noised_target"]


def _as_tensor(value: object, field: str) -> Tensor:
    """A float32 CPU copy of ``value``; ``ValueError`` naming ``field`` if not numeric/finite."""
    try:
        if isinstance(value, Tensor):
            value = value.detach()
        t = torch.as_tensor(value, dtype=torch.float32, device="cpu").clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{field}: not a numeric array ({err})") from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{field}: must be finite")
    return t


def _broadcast_mask(mask: object | None, shape: tuple[int, ...]) -> Tensor:
    if mask is None:
        return torch.ones(shape)
    m = _as_tensor(mask, "mask")
    if (m < 0).any() or (m > 1).any():
        raise ValueError("mask: values must lie in [0, 1]")
    try:
        return m.expand(shape).clone()
    except RuntimeError:
        raise ValueError(
            f"mask: shape {tuple(m.shape)} does not broadcast to the target's {shape}"
        ) from None


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    """σ ``(B,)`` reshaped to broadcast against x ``(B, *S)``."""
    return sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def noised_target(
    x_ref: Tensor, sigma: Tensor, batch: int, *, seed: int, dtype: torch.dtype, device
) -> Tensor:
    """(1 − σ)·x_ref + σ·ε for each of ``batch`` samples, ε from ``torch.Generator(seed)``.

    ε is drawn on the CPU in float32 (reproducible across devices), then moved.
    """
    generator = torch.Generator().manual_seed(int(seed))
    eps = torch.randn((batch, *x_ref.shape), generator=generator, dtype=torch.float32)
    eps = eps.to(device=device, dtype=dtype)
    ref = x_ref.to(device=device, dtype=dtype).unsqueeze(0)
    s = _per_sample(sigma, eps)
    return (1 - s) * ref + s * eps


class MaskedTarget:
    """Constraint expert tying ``mask ⊙ x`` to ``mask ⊙ target`` (see the module docstring).

    Args:
        target: x_ref, shape S (latents or pixels).
        mask: values in [0, 1], shape S or broadcastable to it; default all ones.
        weight: w > 0 of the Gaussian log-potential.
        name: the expert's name.
        max_batch: the largest batch per call, or ``None``.
        propose: announce ``PROPOSE`` (the random replacement).
        project: announce ``PROJECT`` (the deterministic shell projection).
        score: announce ``SCORE`` and ``LOG_PROB``: the noised tie joins the sampler's MCMC
            target (see the module docstring) instead of its weights.
    """

    def __init__(
        self,
        target: Tensor | Sequence,
        mask: Tensor | Sequence | float | None = None,
        weight: float = 1.0,
        *,
        name: str = "masked_target",
        max_batch: int | None = None,
        propose: bool = True,
        project: bool = False,
        score: bool = False,
    ) -> None:
        self.target = _as_tensor(target, "target")
        if self.target.ndim == 0:
            raise ValueError("target: needs at least one dimension (the sample shape)")
        self.mask = _broadcast_mask(mask, tuple(self.target.shape))
        weight = float(weight)
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"weight: must be positive and finite, got {weight}")
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(f"max_batch: must be positive, got {max_batch}")
        self.weight = weight
        self._name = str(name)
        self._max_batch = None if max_batch is None else int(max_batch)
        switches = (
            (Capability.PROPOSE, propose),
            (Capability.PROJECT, project),
            (Capability.SCORE, score),
            (Capability.LOG_PROB, score),
        )
        self._capabilities = frozenset(c for c, on in switches if on)

    # ------------------------------------------------------------------ protocol

    def describe(self) -> ExpertInfo:
        digest = hashlib.sha256()
        for t in (self.target, self.mask, torch.tensor([self.weight])):
            digest.update(t.numpy().tobytes())
        return ExpertInfo(
            name=self._name,
            kind=ExpertKind.CONSTRAINT,
            capabilities=self._capabilities,
            sample_shape=tuple(self.target.shape),
            max_batch=self._max_batch,
            model_id="masked-target",
            revision=digest.hexdigest()[:12],
        )

    def log_potential(self, x0: Tensor) -> Tensor:
        """φ(x0) = −(w/2)·‖m⊙(x0 − x_ref)‖², shape ``(B,)``, x0's dtype."""
        self._check(x0, "x0")
        ref, m = self._params(x0)
        residual = m * (x0 - ref)
        return (-0.5 * self.weight * residual.flatten(1).square().sum(1)).to(x0.dtype)

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        """(1 − m)⊙x + m⊙((1 − σ)·x_ref + σ·ε), ε from ``torch.Generator(seed)``."""
        self._check(x, "x")
        noised = noised_target(
            self.target, sigma, x.shape[0], seed=seed, dtype=x.dtype, device=x.device
        )
        m = self.mask.to(device=x.device, dtype=x.dtype)
        return (1 - m) * x + m * noised

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Radial projection of the masked implied noise onto its typical shell ‖ε̂‖² = n."""
        self._check(x, "x")
        ref, m = self._params(x)
        s = _per_sample(sigma, x)
        centre = (1 - s) * ref
        eps = (x - centre) / s
        inside = (m > 0).to(x.dtype)
        n = inside.sum().clamp(min=1)
        norm = (inside * eps).flatten(1).square().sum(1).sqrt()
        scale = torch.where(norm > 0, n.sqrt() / norm.clamp(min=1e-30), torch.ones_like(norm))
        projected = centre + s * eps * scale.reshape((-1,) + (1,) * (x.ndim - 1))
        return (1 - m) * x + m * projected

    # ------------------------------------------------------------------ the noised tie

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """∇ log q_σ(x_σ) = −m⊙(x_σ − (1 − σ)·x_ref) / ((1 − σ)²/w + σ²)."""
        self._check(x, "x")
        ref, m = self._params(x)
        s = _per_sample(sigma, x)
        return -m * (x - (1 - s) * ref) / self._variance(s)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log q_σ(x_σ) up to a σ-only constant: −½‖√m⊙(x_σ − (1 − σ)·x_ref)‖² / var_σ."""
        self._check(x, "x")
        ref, m = self._params(x)
        s = _per_sample(sigma, x)
        quad = (m * (x - (1 - s) * ref).square()).flatten(1).sum(1)
        return -0.5 * quad / self._variance(s).flatten()

    def _variance(self, s: Tensor) -> Tensor:
        return (1 - s) ** 2 / self.weight + s**2

    # ------------------------------------------------------------------ conditions

    def prepare(self, condition: Condition) -> MaskedTarget:
        """A view tying to the condition's tensors ``target`` (and ``mask``), scalar ``weight``.

        Lets one served expert take a different target per job (``Prepare``); the target must
        keep this expert's sample shape. Errors are ``ExpertError`` naming the condition field.
        """
        unknown = sorted(set(condition.tensors) - {"target", "mask"})
        unknown += sorted(set(condition.scalars) - {"weight"})
        if condition.text or unknown:
            what = "text" if condition.text else unknown[0]
            raise ExpertError.invalid(f"condition.{what}", "not understood by masked_target "
                                      "(tensors: target, mask; scalars: weight)")  # fmt: skip
        if "target" not in condition.tensors:
            if condition.is_empty():
                return self
            raise ExpertError.invalid("condition.tensors[target]", "required")
        try:
            return self.with_target(
                condition.tensors["target"],
                condition.tensors.get("mask"),
                condition.scalars.get("weight"),
            )
        except ValueError as e:
            field, _, reason = str(e).partition(": ")
            kind = "scalars" if field == "weight" else "tensors"
            raise ExpertError.invalid(f"condition.{kind}[{field}]", reason) from None

    # ------------------------------------------------------------------ helpers

    def with_target(
        self, target: Tensor, mask: Tensor | None = None, weight: float | None = None
    ) -> MaskedTarget:
        """A copy tying to another target (and mask/weight) of the same sample shape."""
        target = _as_tensor(target, "target")
        if tuple(target.shape) != tuple(self.target.shape):
            raise ValueError(
                f"target: shape {tuple(target.shape)}, expected {tuple(self.target.shape)}"
            )
        return MaskedTarget(
            target,
            self.mask if mask is None else mask,
            self.weight if weight is None else weight,
            name=self._name,
            max_batch=self._max_batch,
            propose=Capability.PROPOSE in self._capabilities,
            project=Capability.PROJECT in self._capabilities,
            score=Capability.SCORE in self._capabilities,
        )

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(like.dtype, torch.float32)
        return (
            self.target.to(device=like.device, dtype=dtype),
            self.mask.to(device=like.device, dtype=dtype),
        )

    def _check(self, x: Tensor, field: str) -> None:
        shape = tuple(self.target.shape)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{field}: expected a floating tensor")
        if tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
            raise ValueError(f"{field}: expected shape (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")  # fmt: skip
