"""The one place where the kernel calls experts.

Every expert call of a run goes through :class:`ExpertCalls`, which

* chunks each batch by the smaller of the run's ``max_batch`` and the expert's own limit,
* calls different experts concurrently (a thread per expert, so remote experts overlap and
  one level costs the slowest expert, not the sum); chunks of one expert run in order, unless
  it serves several at once (:class:`ConcurrentExpert`, e.g. replicas: then up to
  ``concurrent_chunks`` of them run together, the same chunks as in order),
* checks the shapes of what comes back (an expert's bug is reported with its name),
* counts calls and wall-clock seconds per expert, read and reset once per level.

Results do not depend on the concurrency: experts are deterministic functions of their
inputs, and results are assembled in factor order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from math import inf
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from poegen.kernel.experts import ExpertInfo
from poegen.kernel.spec import Factor


@dataclass(frozen=True, slots=True)
class ExpertStats:
    """One expert during one level: calls (after chunking), samples evaluated (the sum of
    the calls' batch sizes), wall-clock seconds, and of the samples those of ``velocity_vjp``
    calls (a forward and a backward pass each: a conditional expert's coupling)."""

    calls: int = 0
    seconds: float = 0.0
    samples: int = 0
    vjp_samples: int = 0


@dataclass(frozen=True, slots=True)
class BoundFactor:
    """A factor with its expert's description and its name in this run."""

    factor: Factor
    info: ExpertInfo
    name: str


@dataclass(frozen=True, slots=True)
class Call:
    """One batched call: ``method`` of ``bound``'s expert on ``batch`` (chunked along dim 0)
    with ``extra`` per-sample tensors (chunked alike) and ``kwargs`` passed unchanged."""

    bound: BoundFactor
    method: str
    batch: Tensor
    extra: tuple[Tensor, ...] = ()
    kwargs: dict[str, object] = field(default_factory=dict)
    per_sample_output: bool = False  # True: output (B,); False: output shaped like batch
    any_sample_shape: bool = False  # True: output (B, *any) (e.g. decode: latents → pixels)


@runtime_checkable
class ConcurrentExpert(Protocol):
    """An expert that serves ``concurrent_chunks`` calls at once (a replicated remote expert:
    one per replica, :mod:`poegen.kernel.replicas`). Chunks are cut as for any expert, so the
    result is the same; only how many are in flight changes."""

    concurrent_chunks: int


def worker_pool(max_workers: int, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads use as many torch intra-op threads as the thread that made it.

    ``torch.set_num_threads(n)`` reaches OpenMP through ``omp_set_num_threads``, a per-thread
    setting of the calling thread; a new thread starts from OpenMP's default (one thread per
    core) although ``torch.get_num_threads()`` still answers n there. A pool thread computing
    on the CPU would then run a team of its own: oversubscribed, slower (a 512×512 matmul loop:
    1.3 s of wall and 1.7 s of CPU against 0.8 s in the main thread, on 2 cores).
    """
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(
        max_workers,
        thread_name_prefix=prefix,
        initializer=torch.set_num_threads,
        initargs=(threads,),
    )


class ExpertCalls:
    """Chunked, concurrent, accounted expert calls for one sampling run."""

    def __init__(self, factors: Sequence[BoundFactor], max_batch: int | None) -> None:
        self._factors = tuple(factors)
        self._max_batch = max_batch
        self._stats: dict[str, ExpertStats] = {b.name: ExpertStats() for b in factors}
        self._lock = threading.Lock()  # one expert may serve two calls of a batch at once
        workers = max(1, len(self._factors))
        self._executor: Executor = worker_pool(workers, "poegen-expert")
        # separate pools: a chunk never waits for a thread held by the call it belongs to
        self._chunk_pools: dict[int, Executor] = {}
        for b in self._factors:
            expert = b.factor.expert
            parallel = isinstance(expert, ConcurrentExpert) and expert.concurrent_chunks > 1
            if parallel and id(expert) not in self._chunk_pools:
                pool = worker_pool(expert.concurrent_chunks, "poegen-chunk")
                self._chunk_pools[id(expert)] = pool

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for pool in self._chunk_pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ExpertCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, calls: Sequence[Call]) -> list[Tensor]:
        """Run the calls, one thread per distinct expert; results in the order given."""
        if len(calls) == 1:
            return [self._run_one(calls[0])]
        futures = [self._executor.submit(self._run_one, c) for c in calls]
        return [f.result() for f in futures]

    def take_stats(self) -> dict[str, ExpertStats]:
        """Per-expert counts since the last call, then reset."""
        with self._lock:
            stats, self._stats = self._stats, {b.name: ExpertStats() for b in self._factors}
        return stats

    def _chunk_size(self, info: ExpertInfo, batch: int) -> int:
        limits = [m for m in (self._max_batch, info.max_batch) if m]
        return min([batch, *limits]) if limits else batch

    def _run_one(self, call: Call) -> Tensor:
        method: Callable[..., Tensor] = getattr(call.bound.factor.expert, call.method)
        n = call.batch.shape[0]
        size = max(1, self._chunk_size(call.bound.info, n))
        spans = [(lo, min(lo + size, n)) for lo in range(0, n, size)]

        def chunk(lo: int, hi: int) -> Tensor:
            args = (call.batch[lo:hi], *(e[lo:hi] for e in call.extra))
            return self._checked(call, method(*args, **call.kwargs), hi - lo)

        start = time.perf_counter()
        pool = self._chunk_pools.get(id(call.bound.factor.expert))
        if pool is None or len(spans) == 1:
            outputs = [chunk(lo, hi) for lo, hi in spans]
        else:
            futures = [pool.submit(chunk, lo, hi) for lo, hi in spans]
            try:
                outputs = [f.result() for f in futures]
            finally:
                for f in futures:  # after a failure: the chunks not started are not sent
                    f.cancel()
        elapsed = time.perf_counter() - start
        chunks = (n + size - 1) // size
        with self._lock:
            old = self._stats[call.bound.name]
            vjp = n if call.method == "velocity_vjp" else 0
            self._stats[call.bound.name] = ExpertStats(
                old.calls + chunks, old.seconds + elapsed, old.samples + n, old.vjp_samples + vjp
            )
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _checked(call: Call, out: object, batch: int) -> Tensor:
        name = call.bound.name
        if not isinstance(out, Tensor):
            raise TypeError(f"expert {name!r}: {call.method}() returned {type(out).__name__}")
        want = (batch,) if call.per_sample_output else (batch, *call.batch.shape[1:])
        if call.any_sample_shape:
            want = (batch, *out.shape[1:]) if out.ndim >= 1 else (batch,)
        if tuple(out.shape) != want:
            raise ValueError(
                f"expert {name!r}: {call.method}() returned shape {tuple(out.shape)}, "
                f"expected {want}"
            )
        # velocities and scores must be finite; a log-density or potential may be −inf (outside
        # a support), never NaN or +inf
        if out.is_floating_point():
            finite = call.method in _FINITE_METHODS
            bad = ~torch.isfinite(out) if finite else out.isnan() | (out == inf)
            if bool(bad.any()):
                nan = int(out.isnan().sum())
                raise NonFiniteOutputError(
                    call.bound.factor, name, call.method, nan, int(bad.sum()) - nan
                )
        return out.to(call.batch.dtype)


_FINITE_METHODS = frozenset({"velocity", "score", "velocity_vjp"})


class NonFiniteOutputError(ValueError):
    """An expert answered with NaN or infinite values: the run stops, naming the expert."""

    def __init__(self, factor: Factor, name: str, method: str, nan: int, inf: int) -> None:
        super().__init__(
            f"expert {name!r}: {method}() returned {nan} NaN and {inf} infinite values"
        )
        self.factor = factor
        self.expert = name
        self.method = method
