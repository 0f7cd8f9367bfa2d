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

Jobs by id (against a Sampler service): every job has an id (``GenerationResult.job_id``;
``job_id=`` chooses it, and a retried call with the same id never starts the job twice).
``detach=True`` keeps the job running when the client leaves; ``attach(job_id)`` follows a
running job (or gets an ended job's result), ``job(job_id)`` / ``jobs()`` report
:class:`JobInfo`, ``cancel(job_id)`` stops it. ``reattach_s=`` (client option, 0 by default)
re-attaches a stream broken by a Sampler restart for up to that many seconds: a Sampler
with a durable job store resumes the job from its last level, so the result is the one the
uninterrupted job would have given (the events of the levels run while disconnected are
missing from ``trace``)::

    with Client("127.0.0.1:50050", reattach_s=60) as client:
        result = client.generate(spec, job_id="cats-42", detach=True)
        client.job("cats-42").state                                   # "succeeded"

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
        vjp_samples: per expert name, how many of its samples were ``VelocityVjp`` (a
            conditional expert's coupling: a forward and a backward pass each); 0 if none.
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
    # its own field, not a fourth entry of the timings' tuples, which callers unpack as three
    vjp_samples: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None; no preview)."""
        out: dict[str, Any] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            if name in ("preview", "vjp_samples"):  # vjp_samples: inside each timing below
                continue
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if name == "timings":
                value = {
                    k: {"calls": c, "seconds": s, "samples": n,
                        "vjp_samples": self.vjp_samples.get(k, 0)}
                    for k, (c, s, n) in value.items()
                }  # fmt: skip
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
class JobInfo:
    """Where a job stands on the Sampler (mirrors ``JobStatus``).

    Attributes:
        job_id: its id.
        state: ``"queued"``, ``"running"``, ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
        levels_done: noise levels finished (and checkpointed).
        levels: levels of the whole job (0 until the first has finished).
        resumes: how many times it went on from a checkpoint after a Sampler restart.
        error: a failed job's error (code, field, reason), else None.
        created_at: when it was accepted (Unix seconds).
        ended_at: when it ended (Unix seconds), None while it has not.
    """

    job_id: str
    state: str
    levels_done: int
    levels: int
    resumes: int
    error: GenerationError | None
    created_at: float
    ended_at: float | None

    @classmethod
    def from_proto(cls, status: sampler_pb2.JobStatus) -> JobInfo:
        name = sampler_pb2.JobState.Name(status.state).removeprefix("JOB_STATE_").lower()
        error = None
        if status.error_code:
            code = _CODES.get(status.error_code, grpc.StatusCode.UNKNOWN)
            error = GenerationError(code, status.error_field, status.error_message)
        return cls(
            status.job_id, name, int(status.levels_done), int(status.levels),
            int(status.resumes), error, float(status.created_at), status.ended_at or None,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        if self.error is not None:
            out["error"] = {"code": self.error.code.name, "field": self.error.field,
                            "reason": self.error.reason}  # fmt: skip
        return out


_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The weighted particle set of a job, with decoded samples (see the module docstring).

    Attributes:
        particles: ``(N, *S)``.
        log_weights: normalised log-weights ``(N,)`` (float64; logsumexp 0).
        log_evidence: log Z estimate: of the rewards and constraints under the generative
            product (Euler), or of the whole product (FK).
        best_index: the best living particle.
        experts: per factor, the model and revisions that served it.
        trace: one :class:`ProgressEvent` per level.
        seconds: wall-clock seconds of the job (decoding excluded).
        sample_shape: S.
        pixels: decoded samples in [-1, 1], ``(K, C, H, W)`` or ``(K, C, F, H, W)``, or None.
        image_indices: the particle index of each decoded sample (highest weight first).
        images: PIL images of image samples.
        video: ``(K, F, H, W, 3)`` uint8 frames of video samples, or None.
        job_id: the job's id on the Sampler service ("" in-process).
        transition: the transition the job ran, "fk" or "euler" ("auto" resolved).
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
    job_id: str = ""
    transition: str = ""

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
        self.job_id = ""  # the Sampler's id of the job, once accepted

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
        reattach_s: how long a job's stream broken by the Sampler's restart (UNAVAILABLE) is
            re-attached for; 0: not at all (the call fails at once).
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
        reattach_s: float = 0.0,
    ) -> None:
        traces.check(tracing)
        if not (reattach_s >= 0 and math.isfinite(reattach_s)):
            raise ValueError(f"reattach_s: a finite number of seconds >= 0, got {reattach_s}")
        self.reattach_s = reattach_s
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
        job_id: str | None = None,
        detach: bool = False,
    ) -> GenerationResult:
        """Run ``spec`` to the end; the result with decoded samples (``job_id``, ``detach``:
        see the module docstring)."""
        result = None
        async for event in self.stream(spec, timeout=timeout, job_id=job_id, detach=detach):
            if isinstance(event, GenerationResult):
                result = event
            elif on_progress is not None:
                on_progress(event)
        assert result is not None
        return result

    async def stream(
        self,
        spec: GenerationSpec,
        *,
        timeout: float | None = None,
        job_id: str | None = None,
        detach: bool = False,
    ) -> AsyncIterator[Event]:
        """Yield a :class:`ProgressEvent` per level, then the :class:`GenerationResult`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shape = spec.sample_shape or await asyncio.to_thread(self._default_shape, spec)
        request = to_request(spec, shape, self.endpoints)
        if job_id is not None or detach:
            if not self.sampler:
                raise PoegenError("job_id and detach need a Sampler service (in-process: none)")
            request.job_id, request.detach = job_id or "", detach
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
        result = _result(raw, tuple(trace), time.perf_counter() - pace.started, tuple(shape),
                         pace.job_id)  # fmt: skip
        yield await asyncio.to_thread(self._decoded, spec, request, result)

    async def attach(
        self, job_id: str, *, spec: GenerationSpec | None = None, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """Follow a job by id: a :class:`ProgressEvent` per level from now on, then the
        :class:`GenerationResult` (its samples decoded as ``spec`` says, when given; an
        ended job: its result at once). Leaving early leaves the job running."""
        status = await self.job(job_id)
        pace = _Pace(status.levels or None)
        pace.job_id = job_id
        trace: list[ProgressEvent] = []
        raw = None
        call = self._stub().Attach(
            sampler_pb2.AttachRequest(job_id=job_id), metadata=bearer_metadata(self.token),
            timeout=timeout,
        )  # fmt: skip
        try:
            async for reply in call:
                if reply.HasField("level"):
                    trace.append(_progress(reply.level, pace))
                    yield trace[-1]
                elif reply.HasField("result"):
                    raw = reply.result
        except grpc.aio.AioRpcError as e:
            raise rpc_failure(e, self.sampler or "", "sampler") from None
        finally:
            if not call.done():
                call.cancel()
        assert raw is not None
        particles = codec.decode(raw.particles, field="particles")
        shape = tuple(particles.shape[1:])
        result = _result(raw, tuple(trace), time.perf_counter() - pace.started, shape, job_id)
        if spec is not None:
            request = to_request(spec, list(shape), self.endpoints)
            result = await asyncio.to_thread(self._decoded, spec, request, result)
        yield result

    async def job(self, job_id: str) -> JobInfo:
        """The status of a job."""
        reply = await self._unary("GetJob", sampler_pb2.GetJobRequest(job_id=job_id))
        return JobInfo.from_proto(reply.job)

    async def cancel(self, job_id: str) -> JobInfo:
        """Stop a job (queued or running); its status after (an ended job's is unchanged)."""
        reply = await self._unary("CancelJob", sampler_pb2.CancelJobRequest(job_id=job_id))
        return JobInfo.from_proto(reply.job)

    async def jobs(self) -> list[JobInfo]:
        """The Sampler's jobs: running and queued first, then ended ones, newest first."""
        reply = await self._unary("ListJobs", sampler_pb2.ListJobsRequest())
        return [JobInfo.from_proto(status) for status in reply.jobs]

    async def _unary(self, method: str, request: Any) -> Any:
        if not self.sampler:
            raise PoegenError(f"{method} needs a Sampler service (in-process: no jobs by id)")
        rpc = getattr(self._stub(), method)
        try:
            return await rpc(request, metadata=bearer_metadata(self.token), timeout=30.0)
        except grpc.aio.AioRpcError as e:
            raise rpc_failure(e, self.sampler, "sampler") from None

    # ----------------------------------------------------------------------- service

    async def _remote(
        self, request: sampler_pb2.GenerateRequest, pace: _Pace, deadline: float | None
    ) -> AsyncIterator[Any]:
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        metadata = bearer_metadata(self.token)
        call: Any = self._stub().Generate(request, metadata=metadata, timeout=timeout)
        broken_at = None  # when the stream broke, while re-attaching
        finished = attached = False
        try:
            while True:
                try:
                    async for reply in call:
                        if reply.HasField("job"):
                            pace.job_id, broken_at = reply.job.job_id, None
                        elif reply.HasField("level"):
                            yield _progress(reply.level, pace)
                        else:
                            finished = True
                            yield reply.result
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                        raise GenerationTimeout(
                            f"the job ran past its timeout of {timeout:.3g} s; it was cancelled"
                        ) from None
                    broken_at = broken_at or time.monotonic()
                    if not self._reattach(e, pace.job_id, broken_at):
                        raise rpc_failure(e, self.sampler or "", "sampler") from None
                await asyncio.sleep(_REATTACH_PAUSE_S)
                timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
                attach = sampler_pb2.AttachRequest(job_id=pace.job_id)
                call = self._stub().Attach(attach, metadata=metadata, timeout=timeout)
                attached = True
        finally:
            if not call.done():
                call.cancel()  # leaving early (break, task cancelled): cancel the job
            if not finished and not request.detach and attached:
                # an Attach stream never cancels its job: cancel it as Generate's would
                with contextlib.suppress(Exception):
                    await self.cancel(pace.job_id)

    def _reattach(self, error: grpc.aio.AioRpcError, job_id: str, broken_at: float) -> bool:
        """Whether a broken stream of job ``job_id`` is worth re-attaching: the Sampler is
        away (restarting), and not for longer than ``reattach_s``."""
        if not job_id or self.reattach_s <= 0:
            return False
        if time.monotonic() - broken_at > self.reattach_s:
            return False
        return error.code() == grpc.StatusCode.UNAVAILABLE

    # ----------------------------------------------------------------------- in-process

    async def _local(
        self, request: sampler_pb2.GenerateRequest, pace: _Pace, deadline: float | None
    ) -> AsyncIterator[Any]:
        """The Sampler service's own job (:class:`poegen.kernel.service.Job`), in this process:
        the same validation, link resolution, errors and stop semantics, without the hop."""
        from poegen.kernel.errors import ExpertError, grpc_code
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
            raise GenerationError(
                grpc_code(e.code), e.field, e.reason, where="in-process"
            ) from None
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
                            grpc_code(error.code), error.field, error.reason, where="in-process"
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
        vjp_samples={t.name: int(t.vjp_samples) for t in level.timings},
    )


def _result(
    raw: sampler_pb2.GenerateResult,
    trace: tuple[ProgressEvent, ...],
    seconds: float,
    shape: tuple[int, ...],
    job_id: str = "",
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
        job_id=job_id,
        transition=raw.transition,
    )


# --------------------------------------------------------------------------- sync client

_REATTACH_PAUSE_S = 0.25  # between two tries to re-attach a broken stream
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
        job_id: str | None = None,
        detach: bool = False,
    ) -> GenerationResult:
        """Run ``spec`` to the end (see :meth:`AsyncClient.generate`)."""
        return self._call(
            self._async.generate(
                spec, timeout=timeout, on_progress=on_progress, job_id=job_id, detach=detach
            )
        )

    def stream(
        self,
        spec: GenerationSpec,
        *,
        timeout: float | None = None,
        job_id: str | None = None,
        detach: bool = False,
    ) -> Iterator[Event]:
        """Yield a :class:`ProgressEvent` per level, then the :class:`GenerationResult`;
        leaving the loop early cancels the job (unless ``detach``)."""
        return self._iterate(
            self._async.stream(spec, timeout=timeout, job_id=job_id, detach=detach)
        )

    def attach(
        self, job_id: str, *, spec: GenerationSpec | None = None, timeout: float | None = None
    ) -> Iterator[Event]:
        """Follow a job by id (see :meth:`AsyncClient.attach`)."""
        return self._iterate(self._async.attach(job_id, spec=spec, timeout=timeout))

    def job(self, job_id: str) -> JobInfo:
        """The status of a job."""
        return self._call(self._async.job(job_id))

    def cancel(self, job_id: str) -> JobInfo:
        """Stop a job; its status after."""
        return self._call(self._async.cancel(job_id))

    def jobs(self) -> list[JobInfo]:
        """The Sampler's jobs (see :meth:`AsyncClient.jobs`)."""
        return self._call(self._async.jobs())

    def _iterate(self, events: AsyncIterator[Event]) -> Iterator[Event]:
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
    "JobInfo",
    "ProgressEvent",
]


def _addresses(request: sampler_pb2.GenerateRequest) -> tuple[str, ...]:
    """The experts a request names (factors and condition sources)."""
    named = [*(f.address for f in request.factors), *(s.address for s in request.sources)]
    return tuple(a.strip() for a in named if a.strip())
