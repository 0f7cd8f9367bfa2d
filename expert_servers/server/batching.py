"""Dynamic batching: concurrent calls that can share a forward pass are merged into one.

Off unless ``ServerConfig.batch_delay_ms`` (``poegen serve … --batch-delay-ms N``) is above 0.
Then a Velocity, LogProb or Score call, once decoded and validated on its own (so a bad request
fails alone, with its own field, before it could meet anyone), becomes a :class:`BatchItem`
and waits in the group of its :class:`BatchKey`. Calls merge only when the key is equal: the
same method, the same model revision, the same target (one condition handle, or the model's
unconditioned self), the same sample shape and dtypes. A group's rows are concatenated along
the batch dimension, the expert runs once, and each caller gets exactly its own rows back
(``out.split(rows)``), in a reply that names the revision the whole batch ran on.

When a group goes (the first of):

1. its rows reach the model's ``max_batch`` (a call that would overflow it starts the next
   group instead);
2. no batch of its key is running and it holds as many callers as the key had in flight when
   its previous batch ended (that batch's callers plus those waiting then);
3. no batch of its key is running and ``batch_delay_ms`` has passed since the group opened or
   since its key's last batch ended, whichever is later.

So a call waits at most for the batch of its key that is running when it arrives, plus
``batch_delay_ms``. Rule 2 is what keeps a lone job at full speed and lets concurrent jobs
meet: a job that is alone on the host never waits (the previous batch had one caller, so one
is enough; such a call even runs in the thread that decoded it, as with batching off), while
calls arriving as a batch of their key is running wait for it (its callers come back with
their next step), like Triton's dynamic batcher, which queues while the model instance is
busy. Counting the callers waiting at the end of a batch, not only its own, lets jobs that
fell into two convoys (four callers in one batch, four waiting for the next) join again into
one. The delay bounds the wait for companions that do not come (Ray's ``@serve.batch``
``batch_wait_timeout_s``; e.g. one of the jobs ended); it is not spent when everyone the key
had in flight is already there.

Isolation: a caller that cancels leaves its group (or, if its batch already runs, just never
reads its rows); the others are not affected. If a merged forward pass raises, each caller's
rows are computed again on their own, so an error reaches only the calls it belongs to.
The host's admission limits (``max_inflight_calls``/``bytes``) apply to every call before it
is decoded and hold while it waits here, so a merged batch never exceeds what was admitted.

Known cost: a job whose particles reach one key as several concurrent calls (chunks over
``max_batch``) may wait up to ``batch_delay_ms`` once per step: when its first chunk's batch
ends, the next chunk's group waits for that caller, who comes back only after all its chunks.

Determinism: rows are routed by position only; whether an expert gives the same rows in a
merged batch as in separate calls is the expert's property (batch invariance). The tiny FLUX
expert on CPU is bit-for-bit batch invariant for callers of 4 rows or more and differs by
≤ 6e-7 (float32) for callers of 1–3 rows (oneDNN picks other kernels for small matrices), so
merging stays opt-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from poegen.expert_servers.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_KEYS_REMEMBERED = 4096  # previous-batch sizes kept (LRU): one per live handle in practice


@dataclass(frozen=True, slots=True)
class BatchKey:
    """What two calls must share to run in one forward pass.

    Attributes:
        method: "Velocity", "LogProb" or "Score".
        revision: the model revision the call started with.
        target: ``id`` of the object answering it: a condition handle's view or the model.
        sample_shape: ``x.shape[1:]``.
        dtype: ``x.dtype``.
        sigma_dtype: ``sigma.dtype``, or ``None`` for a LogProb without σ.
    """

    method: str
    revision: str
    target: int
    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    sigma_dtype: torch.dtype | None


@dataclass(eq=False, slots=True)
class BatchItem:
    """One validated call, ready to run alone or merged.

    Attributes:
        key: its :class:`BatchKey`.
        x: its rows ``(B, *S)``, validated.
        sigma: ``(B,)`` or ``None``.
        compute: the forward pass, ``compute(x, sigma) -> out`` with ``out.shape[0] == x.shape[0]``,
            checked; the same function for all items of one key (it holds the target).
        finish: this caller's reply from its rows of ``out`` (runs in the worker thread).
        max_rows: the model's ``max_batch`` (``None``: no limit).
    """

    key: BatchKey
    x: Tensor
    sigma: Tensor | None
    compute: Callable[[Tensor, Tensor | None], Tensor]
    finish: Callable[[Tensor], Any]
    max_rows: int | None

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def run_alone(self) -> Any:
        """The call's reply, computed on its own rows only."""
        return self.finish(self.compute(self.x, self.sigma))


@dataclass(eq=False, slots=True)
class _Group:
    key: BatchKey
    max_rows: int | None
    members: list[tuple[BatchItem, asyncio.Future[Any]]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None

    def fits(self, item: BatchItem) -> bool:
        return self.max_rows is None or self.rows + item.rows <= self.max_rows


class DynamicBatcher:
    """Groups :class:`BatchItem`\\ s by key and runs each group once (module docstring).

    ``claim_alone``/``release_alone`` are called from worker threads, everything else on the
    event loop; a lock guards the shared bookkeeping.
    """

    def __init__(self, delay_s: float, executor: Executor, metrics: ServerMetrics) -> None:
        if not delay_s > 0:
            raise ValueError(f"delay_s: must be > 0, got {delay_s}")
        self._delay_s = delay_s
        self._executor = executor
        self._metrics = metrics
        self._lock = threading.Lock()
        self._open: dict[BatchKey, _Group] = {}
        self._running: Counter[BatchKey] = Counter()
        # callers in flight when the key's previous batch ended (see rule 2)
        self._last: OrderedDict[BatchKey, int] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ worker threads

    def claim_alone(self, key: BatchKey) -> bool:
        """True (and the key marked running) when a call of ``key`` should run at once, alone,
        in the calling thread: nobody waits for or runs that key, and it had a single caller
        in flight when its previous batch ended (rule 2 of the module docstring)."""
        with self._lock:
            if key in self._open or self._running[key] or self._last.get(key, 1) > 1:
                return False
            self._running[key] += 1
            return True

    def release_alone(self, item: BatchItem) -> None:
        """The solo run of ``item`` (claimed with :meth:`claim_alone`) is over."""
        self._observe(item.key.method, 1, item.rows)
        with self._lock:
            self._finished(item.key, 1)
            waiting = item.key in self._open
        if waiting and self._loop is not None:
            self._loop.call_soon_threadsafe(self._poke, item.key)

    # ------------------------------------------------------------------ event loop

    async def submit(self, item: BatchItem) -> Any:
        """Wait for ``item``'s group to run; its reply (or its error, raised)."""
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            group = self._open.get(item.key)
            if group is not None and not group.fits(item):
                self._dispatch(group)
                group = None
            if group is None:
                group = self._open[item.key] = _Group(item.key, item.max_rows)
                group.timer = loop.call_later(self._delay_s, self._expire, group)
            group.members.append((item, future))
            group.rows += item.rows
            self._metrics.batch_waiting.inc()
            if self._full(group) or self._ready(group):
                self._dispatch(group)
        try:
            return await future
        except asyncio.CancelledError:
            self._leave(group, future)
            raise

    def _leave(self, group: _Group, future: asyncio.Future[Any]) -> None:
        """A cancelled caller still waiting in ``group`` leaves it."""
        with self._lock:
            if self._open.get(group.key) is not group:
                return  # already running: its rows are computed and dropped
            for i, (item, member) in enumerate(group.members):
                if member is future:
                    del group.members[i]
                    group.rows -= item.rows
                    self._metrics.batch_waiting.dec()
                    break
            if not group.members:
                self._close(group)

    def _full(self, group: _Group) -> bool:
        return group.max_rows is not None and group.rows >= group.max_rows

    def _ready(self, group: _Group) -> bool:
        # under the lock: rule 2 (the key is idle and everyone it had in flight is here)
        key = group.key
        return not self._running[key] and len(group.members) >= self._last.get(key, 1)

    def _poke(self, key: BatchKey) -> None:
        """A batch of ``key`` ended: its waiting group goes now (rule 2), or once the delay
        has passed from now, if the key stays idle (rule 3)."""
        with self._lock:
            group = self._open.get(key)
            if group is None or self._running[key]:
                return
            if self._ready(group):
                self._dispatch(group)
                return
            if group.timer is not None:
                group.timer.cancel()
            loop = asyncio.get_running_loop()
            group.timer = loop.call_later(self._delay_s, self._expire, group)

    def _expire(self, group: _Group) -> None:
        with self._lock:
            if self._open.get(group.key) is not group:
                return
            group.timer = None
            if not self._running[group.key]:  # else the end of that batch re-arms the timer
                self._dispatch(group)

    def _close(self, group: _Group) -> None:
        # under the lock
        if group.timer is not None:
            group.timer.cancel()
        del self._open[group.key]

    def _dispatch(self, group: _Group) -> None:
        """Run ``group`` (under the lock, on the loop)."""
        self._close(group)
        self._metrics.batch_waiting.dec(len(group.members))
        members = [(item, future) for item, future in group.members if not future.done()]
        if not members:
            return
        self._running[group.key] += 1
        task = asyncio.get_running_loop().create_task(self._execute(group.key, members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(
        self, key: BatchKey, members: list[tuple[BatchItem, asyncio.Future[Any]]]
    ) -> None:
        items = [item for item, _ in members]
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, items
            )
        except BaseException as e:  # the executor shut down, or this task was cancelled
            outcomes = [(False, e)] * len(members)
            if isinstance(e, asyncio.CancelledError):
                for _, future in members:
                    future.cancel()
        finally:
            with self._lock:
                self._finished(key, len(members))
            self._poke(key)
        for (_, future), (ok, value) in zip(members, outcomes, strict=True):
            if future.done():  # its caller cancelled
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _finished(self, key: BatchKey, callers: int) -> None:
        # under the lock
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]
        group = self._open.get(key)
        self._last[key] = callers + (len(group.members) if group is not None else 0)
        self._last.move_to_end(key)
        while len(self._last) > _KEYS_REMEMBERED:
            self._last.popitem(last=False)

    # ------------------------------------------------------------------ worker thread

    def _run(self, items: list[BatchItem]) -> list[tuple[bool, Any]]:
        """One forward pass for ``items`` (in a worker thread): (ok, reply or error) each."""
        first = items[0]
        if len(items) == 1:
            self._observe(first.key.method, 1, first.rows)
            return [_outcome(first.run_alone)]
        x = torch.cat([item.x for item in items])
        sigmas = [item.sigma for item in items if item.sigma is not None]
        sigma = torch.cat(sigmas) if sigmas else None  # one key: all items have σ, or none
        try:
            out = first.compute(x, sigma)
        except Exception:
            # attribute the error to the calls it belongs to: each runs again, alone
            logger.info("a merged batch of %d calls failed; running them one by one", len(items))
            return [_outcome(item.run_alone) for item in items]
        finally:
            del x, sigma
        self._observe(first.key.method, len(items), int(out.shape[0]))
        parts = out.split([item.rows for item in items])
        return [_outcome(item.finish, rows) for item, rows in zip(items, parts, strict=True)]

    def _observe(self, method: str, calls: int, rows: int) -> None:
        self._metrics.merged_calls.labels(method=method).observe(calls)
        self._metrics.merged_rows.labels(method=method).observe(rows)

    async def close(self) -> None:
        """At shutdown, after the server stopped: end the batches still running (their callers
        are gone; a worker thread still computing finishes unobserved, as without batching)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    try:
        return True, fn(*args)
    except Exception as e:
        return False, e
