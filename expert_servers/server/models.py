"""The served model, model ids, and hot swap.

:class:`ModelManager` holds the model that answers new calls. A call takes the current
:class:`LoadedModel` once, at its start, and uses that object until it replies, so a swap
never changes the model under a running call: in-flight calls finish on the old model, new
calls go to the new one, and the old model is freed when its last call returns (nothing else
keeps a reference: its condition views are dropped at the swap, see ``handles``).

``load(model_id, options)`` streams :class:`LoadEvent`\\ s (QUEUED, LOADING…, READY):

* the id is checked first (:func:`resolve_model_id`): a path under the model root (no
  absolute paths, URLs, ``..`` or symlinks leading out of the root) or an allowlisted id;
* the adapter loads the new model in a worker thread, beside the served one;
* a load runs as its own task, so a second request for the same id and options joins it
  (QUEUED, then the same READY revision): one id is loaded once at a time, and loads of one id
  with different options wait for each other on a per-id ``asyncio.Lock``;
* on success the new model is swapped in atomically; on failure the old model keeps serving
  and the stream ends with the error. Error messages name the id as sent, never a path.

Revisions are ``<instance>.<n>``: a random id of this host process and a counter that grows at
every load, so a revision names one loaded model across processes and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from poegen.expert_servers.server.adapter import ModelAdapter, ModelRef, Progress, ServedModel
from poegen.kernel.experts import Expert, ExpertInfo, check_expert
from poegen.kernel.refusal import ExpertError

logger = logging.getLogger(__name__)

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MAX_ID_LENGTH = 1024


class LoadStage(enum.StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class LoadEvent:
    """Progress of a load (mirrors ``LoadModelResponse``)."""

    stage: LoadStage
    progress: float
    message: str
    revision: str = ""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model as served: the expert, its description and the host's bookkeeping.

    Attributes:
        expert: the Expert answering calls.
        info: its ``describe()``, taken once at load.
        model_id: the id it was loaded under (as the client sent it).
        revision: the host's revision of this load.
        latent_space: name of its latent space, or "".
        max_batch: the largest batch one call may carry, or ``None``.
        concurrent: ``ServedModel.concurrent``: calls may run at once; else one at a time.
    """

    expert: Expert
    info: ExpertInfo
    model_id: str
    revision: str
    latent_space: str = ""
    max_batch: int | None = None
    concurrent: bool = True
    # one model call at a time when not concurrent (``ServedModel.concurrent``); reentrant: an
    # expert's lazily prepared default condition runs inside a call
    lock: Any = field(default_factory=threading.RLock, compare=False, repr=False)

    def exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Held around every call into the expert: its lock, or nothing if it is concurrent."""
        return contextlib.nullcontext() if self.concurrent else self.lock


def resolve_model_id(model_id: str, *, root: Path | None, allowlist: tuple[str, ...]) -> ModelRef:
    """Accept an allowlisted id, or a relative path that stays inside ``root``.

    Raises ExpertError (field ``model_id``): INVALID_ARGUMENT for a malformed or escaping id,
    NOT_FOUND for an id that names nothing. Messages never contain the root.
    """
    if not model_id:
        raise ExpertError.invalid("model_id", "must not be empty")
    if len(model_id) > _MAX_ID_LENGTH or any(c == "\\" or ord(c) < 32 for c in model_id):
        raise ExpertError.invalid("model_id", "too long or contains forbidden characters")
    if model_id in allowlist:
        return ModelRef(model_id, None)
    if "://" in model_id or _URL_SCHEME.match(model_id):
        raise ExpertError.invalid("model_id", "URLs are not accepted; give an id under the root")
    relative = PurePosixPath(model_id)
    if relative.is_absolute() or model_id.startswith("~"):
        raise ExpertError.invalid("model_id", "absolute paths are not accepted")
    if ".." in relative.parts:
        raise ExpertError.invalid("model_id", "'..' is not accepted")
    if root is None:
        raise ExpertError.not_found("model_id", f"{model_id!r} is not an allowlisted model id")
    try:
        base = root.resolve(strict=True)
        # resolve() follows symlinks: a link inside the root that leads out of it ends up here
        target = (base / relative).resolve()
    except (OSError, RuntimeError):
        raise ExpertError.invalid("model_id", f"{model_id!r} cannot be resolved") from None
    if target == base or not target.is_relative_to(base):
        raise ExpertError.invalid("model_id", f"{model_id!r} leads outside the model root")
    if not target.exists():
        raise ExpertError.not_found("model_id", f"no model {model_id!r} under the model root")
    return ModelRef(model_id, target)


@dataclass(eq=False, slots=True)
class _LoadJob:
    """One running load; streams subscribe to its events (``None`` ends them)."""

    subscribers: list[asyncio.Queue[LoadEvent | None]] = field(default_factory=list)
    task: asyncio.Task[LoadedModel] | None = None

    def subscribe(self) -> asyncio.Queue[LoadEvent | None]:
        queue: asyncio.Queue[LoadEvent | None] = asyncio.Queue()
        self.subscribers.append(queue)
        return queue

    def publish(self, event: LoadEvent | None) -> None:
        for queue in self.subscribers:
            queue.put_nowait(event)


def _retrieve_exception(task: asyncio.Task[LoadedModel]) -> None:
    # a failed load whose streams were all cancelled must not log "never retrieved"
    if not task.cancelled():
        task.exception()


class ModelManager:
    """The current model, loads and swaps (see the module docstring)."""

    def __init__(
        self,
        *,
        adapter: ModelAdapter | None,
        executor: Executor,
        model_root: Path | None = None,
        allowlist: tuple[str, ...] = (),
        on_swap: Callable[[LoadedModel], Awaitable[None]] | None = None,
    ) -> None:
        self._adapter = adapter
        self._executor = executor
        self._root = model_root
        self._allowlist = tuple(allowlist)
        self._on_swap = on_swap
        self._instance = secrets.token_hex(4)
        self._generation = 0
        self._current: LoadedModel | None = None
        self._jobs: dict[tuple[str, tuple[tuple[str, str], ...]], _LoadJob] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def require(self) -> LoadedModel:
        """The model for a new call; UNAVAILABLE until the first model is loaded."""
        model = self._current
        if model is None:
            raise ExpertError.unavailable("model", "no model loaded yet; retry after LoadModel")
        return model

    def install(self, served: ServedModel, model_id: str) -> LoadedModel:
        """Serve an already built expert (the host's initial model)."""
        model = self._loaded(served, check_expert(served.expert), model_id)
        self._current = model
        return model

    async def load(self, model_id: str, options: Mapping[str, str]) -> AsyncIterator[LoadEvent]:
        """Load ``model_id`` beside the served model and swap to it (module docstring)."""
        ref = resolve_model_id(model_id, root=self._root, allowlist=self._allowlist)
        if self._adapter is None:
            raise ExpertError.failed_precondition("model_id", "this server has no model adapter")
        key = (ref.model_id, tuple(sorted(options.items())))
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _LoadJob()
            queue = job.subscribe()
            job.task = asyncio.create_task(self._run(key, ref, dict(options), job))
            job.task.add_done_callback(_retrieve_exception)
        else:
            queue = job.subscribe()
            yield LoadEvent(LoadStage.QUEUED, 0.0, "joined a running load of the same model")
        while (event := await queue.get()) is not None:
            yield event
        assert job.task is not None
        await asyncio.shield(job.task)  # re-raises a failed load's error

    async def close(self) -> None:
        """Cancel the loads still running (at shutdown); their threads finish unobserved."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        key: tuple[str, tuple[tuple[str, str], ...]],
        ref: ModelRef,
        options: dict[str, str],
        job: _LoadJob,
    ) -> LoadedModel:
        lock, users = self._locks.get(ref.model_id, (asyncio.Lock(), 0))
        self._locks[ref.model_id] = (lock, users + 1)
        try:
            if lock.locked():
                job.publish(LoadEvent(LoadStage.QUEUED, 0.0, "queued behind a load of this id"))
            async with lock:
                self._generation += 1
                revision = f"{self._instance}.{self._generation}"
                job.publish(LoadEvent(LoadStage.LOADING, 0.0, f"loading {ref.model_id}", revision))
                loop = asyncio.get_running_loop()

                def progress(fraction: float, message: str) -> None:
                    fraction = min(max(float(fraction), 0.0), 1.0) if fraction == fraction else 0.0
                    event = LoadEvent(LoadStage.LOADING, fraction, str(message)[:200], revision)
                    loop.call_soon_threadsafe(job.publish, event)

                served, info = await loop.run_in_executor(
                    self._executor, self._load_in_thread, ref, options, progress
                )
                model = self._loaded(served, info, ref.model_id, revision)
                del served, info
                await self._swap(model)
                job.publish(LoadEvent(LoadStage.READY, 1.0, f"serving {ref.model_id}", revision))
                return model
        finally:
            job.publish(None)
            self._jobs.pop(key, None)
            lock, users = self._locks[ref.model_id]
            if users == 1:
                del self._locks[ref.model_id]
            else:
                self._locks[ref.model_id] = (lock, users - 1)

    def _load_in_thread(
        self, ref: ModelRef, options: dict[str, str], progress: Progress
    ) -> tuple[ServedModel, ExpertInfo]:
        assert self._adapter is not None
        failed = False
        try:
            served = self._adapter.load(ref, options, progress)
            if not isinstance(served, ServedModel):
                raise TypeError(f"adapter returned {type(served).__name__}, not ServedModel")
            return served, check_expert(served.expert)
        except ExpertError:
            raise
        except Exception:
            logger.exception("load of model %r failed", ref.model_id)
            failed = True
        # raised outside the handler, so the error holds no traceback of the failed load
        assert failed
        raise ExpertError.failed_precondition(
            "model_id", f"model {ref.model_id!r} failed to load; the previous model keeps serving"
        )

    def _loaded(
        self, served: ServedModel, info: ExpertInfo, model_id: str, revision: str = ""
    ) -> LoadedModel:
        if not revision:
            self._generation += 1
            revision = f"{self._instance}.{self._generation}"
        max_batch = served.max_batch if served.max_batch is not None else info.max_batch
        latent_space = served.latent_space or info.latent_space
        return LoadedModel(
            served.expert, info, model_id, revision, latent_space, max_batch, served.concurrent
        )

    async def _swap(self, model: LoadedModel) -> None:
        self._current = model
        logger.info("serving model %r revision %s", model.model_id, model.revision)
        if self._on_swap is not None:
            await self._on_swap(model)
