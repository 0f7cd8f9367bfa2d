"""The Python SDK: ``AsyncClient`` (asyncio) and ``Client`` (blocking), one job API.

Two ways to run a job:

* against a **Sampler service** (``Client("127.0.0.1:50050")``): the request goes over
  ``SamplerService.Generate``; the service connects to the experts;
* **in-process** (``Client()`` with no sampler): the Sampler service's own job
  (:class:`poegen.kernel.service.Job`: validation, link resolution, errors) runs in a worker
  thread of this process against the remote experts, without the hop to a service.

Either way::

    from poegen import Client, SpecBuilder

    spec = SpecBuilder(seed=0).expert(endpoint="ring").expert(endpoint="bar").build()
    with LocalStack.from_yaml("examples/t1_stack.yaml") as stack, Client.from_stack(stack) as c:
        for event in c.stream(spec):               # ProgressEvent per level, then the result
            ...
        result = c.generate(spec, timeout=120)     # GenerationResult
        result.particles, result.weights, result.images, result.video

    async with AsyncClient("127.0.0.1:50050") as client:
        result = await client.generate(spec)
        async for event in client.stream(spec): ...

Results (:class:`GenerationResult`): the weighted particles ``(N, *S)`` and normalised
log-weights ``(N,)``, the log-evidence, the best index, the experts' revisions, the trace (one
:class:`ProgressEvent` per level), and, when the samples are images or videos, the decoded
samples: ``images`` (PIL, highest weight first, ``output.samples`` of them; their particle
indices in ``image_indices``) or ``video`` (``(K, F, H, W, 3)`` uint8 frames). Latents are
decoded by ``Decode`` of the generative expert with capability ``AUTOENCODER`` (or
``output.decoder``); samples of a pixel-space expert (no autoencoder, ``(C, H, W)`` or
``(C, F, H, W)`` with C = 1 or 3) map from [-1, 1] to pixels directly. ``output.decode:
none`` skips this.

Cancellation and timeouts: ``timeout=`` (seconds, whole job) raises
:class:`~poegen.clients.errors.GenerationTimeout` (a ``TimeoutError``) and cancels the
server-side job; cancelling the task running ``generate``/``stream`` (or leaving a ``stream``
loop early, or Ctrl-C in the blocking client) cancels the gRPC call, which cancels the job on
the service (its experts' calls are cancelled and its condition handles released). In-process
jobs stop between two expert calls. Server errors raise
:class:`~poegen.clients.errors.GenerationError` with the code and the field in the spec's
words (``experts[1].address``).

The blocking :class:`Client` runs an :class:`AsyncClient` on an event loop in a background
thread (the sync SDK wraps the async one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import Tensor

from poegen.clients.endpoints import ClientTLS, EndpointInfo, describe, rpc_failure
from poegen.clients.errors import GenerationError, GenerationTimeout, PoegenError
from poegen.clients.spec import GenerationSpec, address_of, to_request
from poegen.kernel import codec
from poegen.kernel import tracing as traces
from poegen.kernel.transport import DEFAULT_MAX_MESSAGE_BYTES, bearer_metadata, channel_options
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Progress after one noise level (mirrors ``LevelEvent``).

    Attributes:
        step: level index, 0 at the first transition.
        total: levels the job will run (``None`` if unknown).
        sigma: noise level reached.
        ess: ESS / N before any resampling at this level.
        resampled: whether the particles were resampled here.
        acceptance_rate: mean MH acceptance (NaN for unadjusted kernels).
        log_weight_spread: max − min of the finite log-weights.
        reward_scale: tempering scale λ_k in [0, 1].
        log_evidence: running log Z estimate.
        elapsed_s: seconds since the job started.
        eta_s: seconds left at the mean pace so far (``None`` when unknown).
        timings: per expert name, (calls, seconds, samples) of this level.
        preview: the best particle's clean estimate (shape S), when asked for.
    """

    step: int
    total: int | None
    sigma: float
    ess: float
    resampled: bool
    acceptance_rate: float
    log_weight_spread: float
    reward_scale: float
    log_evidence: float
    elapsed_s: float
    eta_s: float | None
    timings: Mapping[str, tuple[int, float, int]] = field(default_factory=dict)
    preview: Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None; no preview)."""
        out: dict[str, Any] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            if name == "preview":
                continue
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if name == "timings":
                value = {
                    k: {"calls": c, "seconds": s, "samples": n} for k, (c, s, n) in value.items()
                }
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class ExpertRecord:
    """Which model answered for a factor, and every revision seen during the job."""

    name: str
    model_id: str
    revision: str
    revisions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The weighted particle set of a job, with decoded samples (see the module docstring).

    Attributes:
        particles: ``(N, *S)``.
        log_weights: normalised log-weights ``(N,)`` (float64; logsumexp 0).
        log_evidence: log Z estimate of the rewards and constraints.
        best_index: the best living particle.
        experts: per factor, the model and revisions that served it.
        trace: one :class:`ProgressEvent` per level.
        seconds: wall-clock seconds of the job (decoding excluded).
        sample_shape: S.
        pixels: decoded samples in [-1, 1], ``(K, C, H, W)`` or ``(K, C, F, H, W)``, or None.
        image_indices: the particle index of each decoded sample (highest weight first).
        images: PIL images of image samples.
        video: ``(K, F, H, W, 3)`` uint8 frames of video samples, or None.
    """

    particles: Tensor
    log_weights: Tensor
    log_evidence: float
    best_index: int
    experts: tuple[ExpertRecord, ...]
    trace: tuple[ProgressEvent, ...]
    seconds: float
    sample_shape: tuple[int, ...]
    pixels: Tensor | None = None
    image_indices: tuple[int, ...] = ()
    images: tuple[Any, ...] = ()
    video: Any = None

    @property
    def weights(self) -> Tensor:
        """Normalised weights ``(N,)``."""
        return self.log_weights.exp()

    @property
    def best(self) -> Tensor:
        return self.particles[self.best_index]

    @property
    def ess(self) -> float:
        """Kish ESS of the final weights: 1 / Σ w²."""
        return float(1.0 / (self.weights**2).sum())


Event = ProgressEvent | GenerationResult


class _Pace:
    """ETA at the mean pace so far."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.started = time.perf_counter()

    def event(self, **values: Any) -> ProgressEvent:
        elapsed = time.perf_counter() - self.started
        step = values["step"]
        eta = None
        if self.total:
            eta = max(0.0, elapsed / (step + 1) * (self.total - step - 1))
        return ProgressEvent(total=self.total, elapsed_s=elapsed, eta_s=eta, **values)


# --------------------------------------------------------------------------- async client


class AsyncClient:
    """The asyncio client (see the module docstring).

    Args:
        sampler: ``host:port`` of a Sampler service; ``None`` runs the kernel in-process.
        endpoints: expert names → addresses, for specs that name experts by ``endpoint``.
        token: bearer token of the Sampler service.
        expert_token: bearer token of the experts (in-process runs and decoding).
        tls: TLS to the Sampler (:class:`~poegen.clients.endpoints.ClientTLS`); plaintext
            when None.
        expert_tls: TLS to the experts this process calls (in-process runs, ``describe``,
            decoding); plaintext when None.
        max_message_bytes: largest message sent and received.
        tracing: OpenTelemetry client spans for its calls, whose context the Sampler and the
            experts continue (:mod:`poegen.kernel.tracing`).
    """

    def __init__(
        self,
        sampler: str | None = None,
        *,
        endpoints: Mapping[str, str] | None = None,
        token: str | None = None,
        expert_token: str | None = None,
        tls: ClientTLS | None = None,
        expert_tls: ClientTLS | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tracing: bool = False,
    ) -> None:
        traces.check(tracing)
        self.tracing = tracing
        self.sampler = sampler
        self.endpoints = dict(endpoints or {})
        self.token = token
        self.expert_token = expert_token
        self.tls = tls
        self.expert_tls = expert_tls
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def from_stack(cls, stack: Any, *, in_process: bool = False, **kwargs: Any) -> AsyncClient:
        """A client of a started :class:`~poegen.clients.stack.LocalStack`."""
        endpoints = stack.endpoints
        sampler = None if in_process else endpoints.sampler
        return cls(sampler, endpoints=endpoints.experts, **kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _stub(self) -> sampler_pb2_grpc.SamplerServiceStub:
        if self._channel is None:
            assert self.sampler is not None
            options = channel_options(self.max_message_bytes)
            interceptors = traces.aio_client_interceptors(self.tracing)
            self._channel = (
                grpc.aio.insecure_channel(self.sampler, options=options, interceptors=interceptors)
                if self.tls is None
                else grpc.aio.secure_channel(
                    self.sampler, self.tls.credentials(), options=options, interceptors=interceptors
                )
            )
        return sampler_pb2_grpc.SamplerServiceStub(self._channel)

    # ----------------------------------------------------------------------- public

    async def describe(self, endpoint: str) -> EndpointInfo:
        """``Describe`` of an expert (an address or an endpoint name)."""
        address = self.endpoints.get(endpoint, endpoint)
        return await asyncio.to_thread(
            describe, address, token=self.expert_token, tls=self.expert_tls
        )

    async def generate(
        self,
        spec: GenerationSpec,
        *,
        timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> GenerationResult:
        """Run ``spec`` to the end; the result with decoded samples."""
        result = None
        async for event in self.stream(spec, timeout=timeout):
            if isinstance(event, GenerationResult):
                result = event
            elif on_progress is not None:
                on_progress(event)
        assert result is not None
        return result

    async def stream(
        self, spec: GenerationSpec, *, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """Yield a :class:`ProgressEvent` per level, then the :class:`GenerationResult`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shape = spec.sample_shape or await asyncio.to_thread(self._default_shape, spec)
        request = to_request(spec, shape, self.endpoints)
        pace = _Pace(spec.total_levels())
        source = (
            self._remote(request, pace, deadline)
            if self.sampler
            else self._local(request, pace, deadline)
        )
        trace: list[ProgressEvent] = []
        raw = None
        try:
            async for item in source:
                if isinstance(item, ProgressEvent):
                    trace.append(item)
                    yield item
                else:
                    raw = item
        finally:
            await source.aclose()
        assert raw is not None
        result = _result(raw, tuple(trace), time.perf_counter() - pace.started, tuple(shape))
        yield await asyncio.to_thread(self._decoded, spec, request, result)

    # ----------------------------------------------------------------------- service

    async def _remote(
        self, request: sampler_pb2.GenerateRequest, pace: _Pace, deadline: float | None
    ) -> AsyncIterator[Any]:
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        call = self._stub().Generate(request, metadata=bearer_metadata(self.token), timeout=timeout)
        try:
            async for reply in call:
                if reply.HasField("level"):
                    yield _progress(reply.level, pace)
                elif reply.HasField("result"):
                    yield reply.result
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                raise GenerationTimeout(
                    f"the job ran past its timeout of {timeout:.3g} s; it was cancelled"
                ) from None
            raise rpc_failure(e, self.sampler or "", "sampler") from None
        finally:
            if not call.done():
                call.cancel()  # leaving early (break, task cancelled): cancel the job

    # ----------------------------------------------------------------------- in-process

    async def _local(
        self, request: sampler_pb2.GenerateRequest, pace: _Pace, deadline: float | None
    ) -> AsyncIterator[Any]:
        """The Sampler service's own job (:class:`poegen.kernel.service.Job`), in this process:
        the same validation, link resolution, errors and stop semantics, without the hop."""
        from poegen.kernel.errors import ExpertError
        from poegen.kernel.service import Job, SamplerServerConfig, job_error, parse_request

        tls = self.expert_tls or ClientTLS()
        allowed = _addresses(request)
        config = SamplerServerConfig(
            expert_token=self.expert_token if allowed else None,  # no expert, no token
            max_message_bytes=self.max_message_bytes,
            # this process is the caller: it may call every expert its own request names
            allowed_experts=allowed,
            expert_ca_file=tls.ca_file,
            expert_cert_file=tls.cert_file,
            expert_key_file=tls.key_file,
            tracing=self.tracing,
        )
        try:
            plan = parse_request(request, config)
        except ExpertError as e:
            raise GenerationError(e.code, e.field, e.reason, where="in-process") from None
        job = Job(plan, config, asyncio.get_running_loop(), lambda _: None, 0)
        queue = job.subscribe()
        job.start()
        try:
            while True:
                timeout = None if deadline is None else deadline - time.monotonic()
                try:
                    if timeout is not None and timeout <= 0:
                        raise TimeoutError
                    item = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise GenerationTimeout(
                        "the job ran past its timeout; it was stopped"
                    ) from None
                if isinstance(item, BaseException):
                    error = job_error(item, plan)
                    if isinstance(error, ExpertError):
                        raise GenerationError(
                            error.code, error.field, error.reason, where="in-process"
                        ) from None
                    raise error
                if not isinstance(item, sampler_pb2.GenerateResponse):
                    return  # the end marker
                if item.HasField("level"):
                    yield _progress(item.level, pace)
                else:
                    yield item.result
        finally:
            job.stop()
            await asyncio.to_thread(job.join)

    # ----------------------------------------------------------------------- helpers

    def _default_shape(self, spec: GenerationSpec) -> list[int]:
        for i, expert in enumerate(spec.experts):
            address = address_of(expert, self.endpoints, f"experts[{i}]")
            info = describe(address, token=self.expert_token, tls=self.expert_tls)
            if info.kind == "generative" and info.sample_shape:
                return list(info.sample_shape)
            if i == len(spec.experts) - 1 and info.sample_shape:
                return list(info.sample_shape)
        raise PoegenError(
            "sample_shape: no expert states its sample shape; give sample_shape in the spec"
        )

    def _decoded(
        self,
        spec: GenerationSpec,
        request: sampler_pb2.GenerateRequest,
        result: GenerationResult,
    ) -> GenerationResult:
        if spec.output.decode == "none":
            return result
        from poegen.clients import outputs

        return outputs.decode_result(
            result,
            spec,
            [f.address for f in request.factors],
            token=self.expert_token,
            tls=self.expert_tls,
        )


def _progress(level: sampler_pb2.LevelEvent, pace: _Pace) -> ProgressEvent:
    """A ProgressEvent from a wire ``LevelEvent``."""
    preview = codec.decode(level.preview, field="preview") if level.HasField("preview") else None
    return pace.event(
        step=int(level.step),
        sigma=float(level.sigma),
        ess=float(level.ess),
        resampled=bool(level.resampled),
        acceptance_rate=float(level.acceptance_rate),
        log_weight_spread=float(level.log_weight_spread),
        reward_scale=float(level.reward_scale),
        log_evidence=float(level.log_evidence),
        timings={t.name: (t.calls, t.seconds, t.samples) for t in level.timings},
        preview=preview,
    )


def _result(
    raw: sampler_pb2.GenerateResult,
    trace: tuple[ProgressEvent, ...],
    seconds: float,
    shape: tuple[int, ...],
) -> GenerationResult:
    records = tuple(
        ExpertRecord(r.name, r.model_id, r.revision, tuple(r.revisions) or (r.revision,))
        for r in raw.experts
    )
    return GenerationResult(
        codec.decode(raw.particles, field="particles").clone(),
        codec.decode(raw.log_weights, field="log_weights").to(torch.float64).clone(),
        float(raw.log_evidence),
        int(raw.best_index),
        records,
        trace,
        seconds,
        shape,
    )


# --------------------------------------------------------------------------- sync client

_POLL_S = 0.05  # how often a blocked call of the sync client looks for a pending Ctrl-C
_CANCEL_WAIT_S = 10.0  # how long an interrupted call waits for its job to stop


class _Running:
    """A coroutine on the sync client's loop, waited for from the calling thread.

    The wait polls. Ctrl-C is a process-directed SIGINT, delivered to any thread that does not
    block it: the loop's, gRPC's, torch's, busy on a loaded machine. Python then raises
    ``KeyboardInterrupt`` in the main thread only when that thread next runs bytecode, so a
    wait that sleeps in ``Future.result()`` would see Ctrl-C only once the job had ended.
    Cancelling waits for the task to finish (its ``finally`` blocks cancel the gRPC call or
    stop the in-process job), so the job is stopped by the time the interrupt propagates.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._done: Future[Any] = Future()
        self._task: asyncio.Task[Any] | None = None

    def start(self, coro: Any) -> None:
        self._loop.call_soon_threadsafe(self._create, coro)

    def done(self) -> bool:
        return self._done.done()

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the call did not end within {timeout} s")
            wait([self._done], timeout=_POLL_S)  # returns at once when it ends
        return self._done.result()

    def cancel(self, timeout: float) -> None:
        """Cancel the task and wait up to ``timeout`` seconds for it to finish."""
        self._loop.call_soon_threadsafe(self._cancel)
        deadline = time.monotonic() + timeout
        while not self._done.done() and time.monotonic() < deadline:
            wait([self._done], timeout=_POLL_S)

    # on the loop's thread (callbacks run in the order they were scheduled: _create first)

    def _create(self, coro: Any) -> None:
        self._task = self._loop.create_task(coro)
        self._task.add_done_callback(self._finished)

    def _cancel(self) -> None:
        if self._task is None:  # never started
            self._done.cancel()
        else:
            self._task.cancel()

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._done.cancel()
        elif (error := task.exception()) is not None:
            self._done.set_exception(error)
        else:
            self._done.set_result(task.result())


class Client:
    """The blocking client: an :class:`AsyncClient` on a background event loop.

    Same arguments as :class:`AsyncClient`. Ctrl-C (``KeyboardInterrupt``) while a job runs
    cancels the job on the server, then propagates.
    """

    def __init__(self, sampler: str | None = None, **kwargs: Any) -> None:
        self._async = AsyncClient(sampler, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="poegen-client", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_stack(cls, stack: Any, *, in_process: bool = False, **kwargs: Any) -> Client:
        endpoints = stack.endpoints
        sampler = None if in_process else endpoints.sampler
        return cls(sampler, endpoints=endpoints.experts, **kwargs)

    @property
    def sampler(self) -> str | None:
        return self._async.sampler

    @property
    def endpoints(self) -> dict[str, str]:
        return self._async.endpoints

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._submit(self._async.close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` on the client's loop and wait for it here; interrupted (Ctrl-C), cancel
        it and wait until it has stopped (the gRPC call cancelled), then re-raise."""
        running = _Running(self._loop)
        try:
            running.start(coro)
            return running.result(timeout)
        except BaseException:
            if not running.done():
                running.cancel(_CANCEL_WAIT_S)
            raise

    def describe(self, endpoint: str) -> EndpointInfo:
        return self._call(self._async.describe(endpoint))

    def generate(
        self,
        spec: GenerationSpec,
        *,
        timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> GenerationResult:
        """Run ``spec`` to the end (see :meth:`AsyncClient.generate`)."""
        return self._call(self._async.generate(spec, timeout=timeout, on_progress=on_progress))

    def stream(self, spec: GenerationSpec, *, timeout: float | None = None) -> Iterator[Event]:
        """Yield a :class:`ProgressEvent` per level, then the :class:`GenerationResult`;
        leaving the loop early cancels the job."""
        events = self._async.stream(spec, timeout=timeout)
        try:
            while True:
                try:
                    yield self._call(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(BaseException):
                self._call(events.aclose(), timeout=30)


__all__ = [
    "AsyncClient",
    "Client",
    "Event",
    "ExpertRecord",
    "GenerationResult",
    "ProgressEvent",
]


def _addresses(request: sampler_pb2.GenerateRequest) -> tuple[str, ...]:
    """The experts a request names (factors and condition sources)."""
    named = [*(f.address for f in request.factors), *(s.address for s in request.sources)]
    return tuple(a.strip() for a in named if a.strip())
