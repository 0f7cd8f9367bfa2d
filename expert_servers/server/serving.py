"""The data plane: validated calls of the served expert, off the event loop.

Each model-call method (``velocity``, ``velocity_vjp``, ``log_prob``, ``score``, ``propose``,
``encode``, ``decode``, ``schedule``, ``render``) takes the :class:`LoadedModel` the call
started with (so a hot swap never changes the model under a running call), checks its inputs
against that model, runs the expert under ``torch.inference_mode()`` (``velocity_vjp`` with
autograd, and ``prepare`` under ``no_grad`` so that its tensors can enter a VJP's graph) and,
for a model that is not ``concurrent`` (a library model: ``ServedModel.concurrent``), one call
at a time, checks what the expert returned, and returns the result. These methods are synchronous and run in the host's worker threads: the
gRPC servicer (``service``) hands a whole call (decode the request, call the expert, serialise
the reply: :meth:`ExpertServing.reply`) to :meth:`ExpertServing.call`, one hop from the event
loop to a worker and back per RPC. Every thread hop is a wake-up, and on a virtual machine
with idle cores each costs a fraction of a millisecond: more than the Python around it.

Input checks, each an :class:`ExpertError` naming the field:

* ``x`` (and ``pixels``/``latents``): a floating dtype (``x.dtype``), a batch dimension of at
  least 1 and, when the expert announces a sample shape, ``(B, *S)`` (``x.shape``); no NaN or
  infinity (``x``, checked in the worker thread); ``B`` at most the model's ``max_batch`` (RESOURCE_EXHAUSTED on ``x.shape``).
* ``sigma``: shape ``(B,)``, floating, each in (0, 1] (see ``refusal.validate_sigma``).
* ``cotangent`` (VelocityVjp): x's shape and dtype, finite.
* ``LogProb``: ``sigma`` required for a generative expert, absent for the other kinds.
* the kind and capabilities: Velocity of a non-generative expert, LogProb with σ of a
  generative expert without ``log_prob``, Propose in a mode it does not announce, Encode/Decode
  without an autoencoder: FAILED_PRECONDITION.

A result of the wrong shape, or with NaN, is the expert's bug: ``RuntimeError`` → INTERNAL.

Dynamic batching (:mod:`~poegen.expert_servers.server.batching`, with a ``batcher``): Velocity,
LogProb and Score are validated into a :class:`~poegen.expert_servers.server.batching.BatchItem`
(``velocity_item`` etc.) in the worker thread; :meth:`ExpertServing.run_or_defer` runs it there
at once (batching off, or the call is alone) or hands it back for
:meth:`ExpertServing.call_batched` to merge with its companions.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import torch
from torch import Tensor

from poegen.expert_servers.server.adapter import Autoencoder, Condition, Conditionable
from poegen.expert_servers.server.batching import BatchItem, BatchKey, DynamicBatcher
from poegen.expert_servers.server.handles import HandleTable
from poegen.expert_servers.server.metrics import ServerMetrics
from poegen.expert_servers.server.models import LoadedModel
from poegen.kernel.codec import (
    Serialized,
    SharedMemoryReader,
    WireMessage,
    encode_into,
)
from poegen.kernel.experts import Capability, Expert, ExpertKind
from poegen.kernel.refusal import ExpertError, validate_finite, validate_sigma
from poegen.kernel.schedule import checked_grid
from poegen.v1 import tensor_pb2

_T = TypeVar("_T")
MAX_SCHEDULE_STEPS = 10_000  # more levels than any sampler needs; bounds the reply
AUTOENCODER = Capability.AUTOENCODER.value  # capability of Encode/Decode (see has_autoencoder)


def _inference(model: LoadedModel, fn: Callable[..., _T], *args: Any) -> _T:
    # inference_mode is thread-local: entered in the worker thread, around the expert only;
    # a model that is not concurrent answers one call at a time (ServedModel.concurrent)
    with model.exclusive(), torch.inference_mode():
        return fn(*args)


def _no_grad(model: LoadedModel, fn: Callable[..., _T], *args: Any) -> _T:
    # Prepare: what it keeps (prompt embeddings, condition latents) may later enter a
    # VelocityVjp's autograd graph, which inference-mode tensors cannot
    with model.exclusive(), torch.no_grad():
        return fn(*args)


class ExpertServing:
    """Validated, threaded calls of the served expert (see the module docstring)."""

    def __init__(
        self,
        handles: HandleTable,
        executor: Executor,
        metrics: ServerMetrics,
        *,
        max_message_bytes: int,
        batcher: DynamicBatcher | None = None,
    ) -> None:
        self._handles = handles
        self._executor = executor
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._batcher = batcher

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread: the synchronous body of one RPC."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def call_batched(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, where it ends with :meth:`run_or_defer`; a call
        deferred there waits for its merged batch here."""
        out = await self.call(fn, *args)
        if isinstance(out, BatchItem):
            assert self._batcher is not None
            return await self._batcher.submit(out)
        return out

    def run_or_defer(self, item: BatchItem) -> Any:
        """In the worker thread: the reply of ``item`` computed now (batching off, or nobody
        to merge with: see ``batching``), or ``item`` itself, to be merged."""
        if self._batcher is None:
            return item.run_alone()
        if not self._batcher.claim_alone(item.key):
            return item
        try:
            return item.run_alone()
        finally:
            self._batcher.release_alone(item)

    @staticmethod
    def reply(
        message: Any,
        field: str,
        t: Tensor,
        room: tensor_pb2.SharedMemoryRef | None = None,
        peer: SharedMemoryReader | None = None,
    ) -> Serialized:
        """``message`` with ``t`` in its tensor ``field``, serialised (in the worker thread).

        With a ``room`` (the client's ``reply_shared_memory``, checked by ``peer``), the bytes
        are written there and the reply carries a reference; otherwise they are appended
        inline from ``t``'s memory (:class:`~poegen.kernel.codec.WireMessage`, one copy).
        """
        if room is None:
            return Serialized(WireMessage(message, {field: t}).SerializeToString())
        if peer is None:
            raise RuntimeError("a reply room without a shared-memory peer")
        getattr(message, field).CopyFrom(encode_into(t, room, peer, field="reply_shared_memory"))
        return Serialized(message.SerializeToString())

    # ------------------------------------------------------------------ conditions

    async def prepare(self, model: LoadedModel, condition: Condition) -> str:
        """A handle for ``condition`` encoded by ``model``."""
        expert = model.expert
        if isinstance(expert, Conditionable):
            view = await self.call(_no_grad, model, expert.prepare, condition)
            if not isinstance(view, Expert):
                raise RuntimeError(f"{model.info.name}: prepare() returned no Expert")
        elif condition.is_empty():
            view = expert
        else:
            raise ExpertError.invalid("condition", "this expert takes no condition")
        handle = self._handles.add(model.revision, view)
        self._metrics.handles.set(len(self._handles))
        return handle

    def release(self, handle: str) -> bool:
        if not handle:
            raise ExpertError.invalid("handle", "must not be empty")
        released = self._handles.release(handle)
        self._metrics.handles.set(len(self._handles))
        return released

    def _target(self, model: LoadedModel, handle: str) -> Any:
        return self._handles.get(handle, model.revision) if handle else model.expert

    # ------------------------------------------------------------------ model calls

    def velocity(self, model: LoadedModel, x: Tensor, sigma: Tensor, handle: str) -> Tensor:
        """v(x_σ, σ) of shape ``x.shape``, dtype ``x.dtype``."""
        return self.velocity_item(model, x, sigma, handle, _rows).run_alone()

    def velocity_item(
        self,
        model: LoadedModel,
        x: Tensor,
        sigma: Tensor,
        handle: str,
        finish: Callable[[Tensor], Any],
    ) -> BatchItem:
        """The validated Velocity call; ``finish(v)`` makes its reply."""
        if model.info.kind != ExpertKind.GENERATIVE:
            raise ExpertError.failed_precondition(
                "x", f"a {model.info.kind} expert has no velocity"
            )
        batch = self._check_batch(model, x, "x", "Velocity")
        validate_sigma(sigma, batch)
        target = self._target(model, handle)
        validate_finite(x, "x")
        sample, dtype = tuple(x.shape[1:]), x.dtype

        def compute(xs: Tensor, s: Tensor | None) -> Tensor:
            v = _inference(model, target.velocity, xs, s)
            return _checked(v, (int(xs.shape[0]), *sample), "velocity").to(dtype)

        return self._item("Velocity", model, target, x, sigma, compute, finish)

    def velocity_vjp(
        self, model: LoadedModel, x: Tensor, sigma: Tensor, cotangent: Tensor, handle: str
    ) -> Tensor:
        """J_v(x_σ)ᵀ·c of shape ``x.shape``, dtype ``x.dtype`` (capability VJP). Runs with
        autograd on (the adapter differentiates its model), never merged with other calls."""
        if model.info.kind != ExpertKind.GENERATIVE or not model.info.supports(Capability.VJP):
            raise ExpertError.failed_precondition(
                "x", "this expert does not answer VelocityVjp (no 'vjp' capability)"
            )
        batch = self._check_batch(model, x, "x", "VelocityVjp")
        validate_sigma(sigma, batch)
        if tuple(cotangent.shape) != tuple(x.shape):
            raise ExpertError.invalid(
                "cotangent.shape", f"{list(cotangent.shape)}, expected x's {list(x.shape)}"
            )
        if cotangent.dtype != x.dtype:
            raise ExpertError.invalid("cotangent.dtype", f"{cotangent.dtype}, expected {x.dtype}")
        target = self._target(model, handle)
        validate_finite(x, "x")
        validate_finite(cotangent, "cotangent")
        with model.exclusive():  # with autograd: the adapter differentiates its model
            out = target.velocity_vjp(x, sigma, cotangent)
        out = _checked(out, tuple(x.shape), "vjp")
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"{model.info.name}: velocity_vjp returned NaN or infinity")
        return out.detach().to(x.dtype)

    def log_prob(self, model: LoadedModel, x: Tensor, sigma: Tensor | None, handle: str) -> Tensor:
        """With σ: log q_σ(x_σ) (generative experts, and others announcing LOG_PROB). Without:
        the log-potential of x̂_0 (discriminative and constraint experts)."""
        return self.log_prob_item(model, x, sigma, handle, _rows).run_alone()

    def log_prob_item(
        self,
        model: LoadedModel,
        x: Tensor,
        sigma: Tensor | None,
        handle: str,
        finish: Callable[[Tensor], Any],
    ) -> BatchItem:
        """The validated LogProb call; ``finish(log_prob)`` makes its reply."""
        generative = model.info.kind == ExpertKind.GENERATIVE
        has_log_prob = model.info.supports(Capability.LOG_PROB)
        if generative and sigma is None:
            raise ExpertError.invalid("sigma", "required for a generative expert")
        if not generative and sigma is not None and not has_log_prob:
            raise ExpertError.invalid(
                "sigma", f"must be absent for a {model.info.kind} expert without log_prob"
            )
        if generative and not has_log_prob:
            raise ExpertError.failed_precondition("x", "this expert does not answer LogProb")
        batch = self._check_batch(model, x, "x", "LogProb")
        target = self._target(model, handle)
        if sigma is not None:
            validate_sigma(sigma, batch)
        validate_finite(x, "x")
        # float32 on the wire (float64 for a float64 batch: no rounding the client did not ask for)
        wire = torch.float64 if x.dtype == torch.float64 else torch.float32
        name = model.info.name

        def compute(xs: Tensor, s: Tensor | None) -> Tensor:
            if s is not None:
                out = _inference(model, target.log_prob, xs, s)
            else:
                out = _inference(model, target.log_potential, xs)
            out = _checked(out, (int(xs.shape[0]),), "log_prob").to(wire)
            if bool(torch.isnan(out).any()) or bool(torch.isposinf(out).any()):
                raise RuntimeError(f"{name}: log_prob holds NaN or +inf")
            return out

        return self._item("LogProb", model, target, x, sigma, compute, finish)

    def score(self, model: LoadedModel, x: Tensor, sigma: Tensor, handle: str) -> Tensor:
        """∇ log q_σ(x_σ) of shape ``x.shape``, dtype ``x.dtype`` (capability SCORE)."""
        return self.score_item(model, x, sigma, handle, _rows).run_alone()

    def score_item(
        self,
        model: LoadedModel,
        x: Tensor,
        sigma: Tensor,
        handle: str,
        finish: Callable[[Tensor], Any],
    ) -> BatchItem:
        """The validated Score call; ``finish(score)`` makes its reply."""
        if not model.info.supports(Capability.SCORE):
            raise ExpertError.failed_precondition("x", "this expert does not answer Score")
        batch = self._check_batch(model, x, "x", "Score")
        validate_sigma(sigma, batch)
        target = self._target(model, handle)
        validate_finite(x, "x")
        sample, dtype = tuple(x.shape[1:]), x.dtype

        def compute(xs: Tensor, s: Tensor | None) -> Tensor:
            out = _inference(model, target.score, xs, s)
            return _checked(out, (int(xs.shape[0]), *sample), "score").to(dtype)

        return self._item("Score", model, target, x, sigma, compute, finish)

    @staticmethod
    def _item(
        method: str,
        model: LoadedModel,
        target: object,
        x: Tensor,
        sigma: Tensor | None,
        compute: Callable[[Tensor, Tensor | None], Tensor],
        finish: Callable[[Tensor], Any],
    ) -> BatchItem:
        sigma_dtype = None if sigma is None else sigma.dtype
        key = BatchKey(method, model.revision, id(target), tuple(x.shape[1:]), x.dtype, sigma_dtype)
        return BatchItem(key, x, sigma, compute, finish, model.max_batch)

    def propose(
        self,
        model: LoadedModel,
        x: Tensor,
        sigma: Tensor,
        *,
        project: bool,
        seed: int,
        handle: str,
    ) -> Tensor:
        """A random move (``project=False``, seeded) or the projection of x_σ at level σ."""
        capability = Capability.PROJECT if project else Capability.PROPOSE
        if not model.info.supports(capability):
            raise ExpertError.failed_precondition("mode", f"this expert does not {capability}")
        batch = self._check_batch(model, x, "x", "Propose")
        validate_sigma(sigma, batch)
        target = self._target(model, handle)
        validate_finite(x, "x")
        if project:
            out = _inference(model, target.project, x, sigma)
        else:
            out = _inference(model, target.propose, x, sigma, seed)
        return _checked(out, tuple(x.shape), "x").to(x.dtype)

    @staticmethod
    def has_autoencoder(model: LoadedModel) -> bool:
        # announced (kernel Capability "autoencoder") and implemented
        announced = any(str(c) == AUTOENCODER for c in model.info.capabilities)
        return announced and isinstance(model.expert, Autoencoder)

    def encode(self, model: LoadedModel, pixels: Tensor) -> Tensor:
        """Latents of pixels in [-1, 1]."""
        return self._autoencode(model, pixels, "pixels", "Encode")

    def decode(self, model: LoadedModel, latents: Tensor) -> Tensor:
        """Pixels in [-1, 1] of latents."""
        return self._autoencode(model, latents, "latents", "Decode")

    def _autoencode(self, model: LoadedModel, t: Tensor, field: str, method: str) -> Tensor:
        if not self.has_autoencoder(model):
            raise ExpertError.failed_precondition(field, "this expert has no autoencoder")
        if t.ndim not in (4, 5):
            raise ExpertError.invalid(
                f"{field}.shape", f"{t.ndim} dimensions, expected (B, C, H, W) or (B, C, F, H, W)"
            )
        self._check_batch(model, t, field, method, sample_shape=False)
        expert: Any = model.expert
        fn = expert.encode if method == "Encode" else expert.decode
        out = _inference(model, fn, validate_finite(t, field))
        if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != t.shape[0]:
            raise RuntimeError(f"{model.info.name}: {method.lower()} returned a wrong batch")
        if out.numel() * out.element_size() > self._max_bytes:
            raise ExpertError.resource_exhausted(
                field, "the reply would exceed the server's message size limit"
            )
        return out

    # ------------------------------------------------------------------ schedule, render

    def schedule(
        self, model: LoadedModel, num_steps: int, sample_shape: tuple[int, ...]
    ) -> list[float]:
        """The expert's noise grid of ``num_steps + 1`` levels for samples of ``sample_shape``."""
        if not model.info.supports(Capability.SCHEDULE):
            raise ExpertError.failed_precondition("num_steps", "this expert has no schedule")
        if not 1 <= num_steps <= MAX_SCHEDULE_STEPS:
            raise ExpertError.invalid(
                "num_steps", f"{num_steps}, expected 1 … {MAX_SCHEDULE_STEPS}"
            )
        if any(n < 1 for n in sample_shape):
            raise ExpertError.invalid("sample_shape", f"{list(sample_shape)} has a size below 1")
        expected = model.info.sample_shape
        if expected is not None and sample_shape and tuple(sample_shape) != tuple(expected):
            raise ExpertError.invalid(
                "sample_shape", f"{list(sample_shape)}, expected {list(expected)}"
            )
        expert: Any = model.expert
        levels = _inference(model, expert.schedule, num_steps, sample_shape)
        # a broken grid is the expert's bug (INTERNAL), not the caller's
        return checked_grid(levels, num_steps, model.info.name).tolist()

    def render(self, model: LoadedModel, handle: str, names: Sequence[str]) -> dict[str, Tensor]:
        """The named outputs derived from the condition of ``handle`` (all when no names)."""
        if not model.info.supports(Capability.RENDER):
            raise ExpertError.failed_precondition("handle", "this expert renders nothing")
        target = self._target(model, handle)
        outputs = _inference(model, target.render)
        if not isinstance(outputs, Mapping) or not all(
            isinstance(t, Tensor) for t in outputs.values()
        ):
            raise RuntimeError(f"{model.info.name}: render() must return named tensors")
        unknown = sorted(set(names) - set(outputs))
        if unknown:
            raise ExpertError.invalid(
                "names", f"no output {unknown} (known: {', '.join(sorted(outputs))})"
            )
        chosen = {n: outputs[n] for n in (names or sorted(outputs))}
        if sum(t.numel() * t.element_size() for t in chosen.values()) > self._max_bytes:
            raise ExpertError.resource_exhausted(
                "names", "the outputs exceed the server's message size limit; ask for fewer"
            )
        return chosen

    # ------------------------------------------------------------------ checks

    def _check_batch(
        self, model: LoadedModel, x: Tensor, field: str, method: str, *, sample_shape: bool = True
    ) -> int:
        """Validate a batch ``(B, *S)``; return B."""
        if not x.is_floating_point():
            raise ExpertError.invalid(
                f"{field}.dtype", f"{x.dtype}, expected f32, f16, bf16 or f64"
            )
        if x.ndim < 1 or x.shape[0] < 1:
            raise ExpertError.invalid(f"{field}.shape", "needs a batch dimension of at least 1")
        batch = int(x.shape[0])
        if model.max_batch is not None and batch > model.max_batch:
            raise ExpertError.resource_exhausted(
                f"{field}.shape", f"batch {batch} over the limit of {model.max_batch}"
            )
        expected = model.info.sample_shape
        if sample_shape and expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ExpertError.invalid(
                f"{field}.shape", f"sample shape {list(x.shape[1:])}, expected {list(expected)}"
            )
        self._metrics.batch_size.labels(method=method).observe(batch)
        return batch


def _rows(out: Tensor) -> Tensor:
    return out


def _checked(out: object, shape: tuple[int, ...], what: str) -> Tensor:
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"expert returned {what} of shape {got}, expected {list(shape)}")
    return out


def finite_scalar(name: str, value: float) -> float:
    """A condition scalar, refused when NaN or infinite."""
    if not math.isfinite(value):
        raise ExpertError.invalid(f"condition.scalars[{name}]", "must be finite")
    return float(value)
