"""The kernel as a gRPC service: ``poegen.v1.SamplerService``.

A ``Generate`` request names the factors of the product by the address of their
``ExpertService``; the service connects a :class:`~poegen.kernel.remote.RemoteExpert` to each
(``Describe``, ``Prepare`` of the factor's condition), runs :func:`poegen.kernel.sampler.sample_iter`
in a thread of its own, streams one ``LevelEvent`` per noise level and ends with the
``GenerateResult``::

    host, port = create_sampler_server(SamplerServerConfig(port=0))   # binds 127.0.0.1
    await host.start()
    ...
    async for reply in stub.Generate(GenerateRequest(factors=[FactorSpec(address=a)], ...)):
        if reply.HasField("level"): print(reply.level.step, reply.level.ess)
        else: result = reply.result

Request → kernel:

* ``settings``: every unset optional field takes the kernel's default, after ``preset``
  (``"default"`` or ``"paper"``); ``max_batch = 0`` means no limit; a non-empty ``sigmas``
  overrides the schedule. Invalid values → INVALID_ARGUMENT naming ``settings.<field>``.
* ``factors[i]``: ``address`` (``host:port``, in ``allowed_experts`` when that list is set,
  else PERMISSION_DENIED; or several replicas, ``ipv4:h:p,h:p`` or ``dns:///name:port``, whose
  chunks are spread across them: :mod:`poegen.kernel.replicas`), ``weight`` (1 when unset),
  ``condition`` (prepared once when present), ``region`` (shape ``sample_shape``), ``name``.
* ``factors[i].links`` and ``sources``: condition tensors rendered by other experts. A link
  ``{tensor, source, output}`` sets tensor ``tensor`` of factor i's condition to output
  ``output`` of the ``Render`` of ``source``: a named factor (its ``name``) or one of
  ``sources`` (experts that only render: ``name``, ``address``, ``condition`` prepared once).
  Links are resolved once per job, before the factor's ``Prepare``: sources are connected
  first, then factors in dependency order (a factor linking to another factor waits for it),
  each ``(source, output)`` rendered once. A link to nothing, to itself, to an expert
  without ``RENDER``, to an output the expert does not render, or links forming a cycle →
  INVALID_ARGUMENT on ``factors[i].links[k].<field>``; sources' failures name ``sources[j]``.
* ``seed`` → the job's ``torch.Generator``; the kernel runs in float32 on the CPU, so a job
  reproduces :func:`~poegen.kernel.sampler.sample` run in-process in float32 with the same
  experts and seed, bit for bit.
* ``preview``: each event carries the best particle's clean estimate (shape S, the job's
  dtype).

Result → wire: particles ``(N, *S)`` in the job's dtype (float32: the service runs the kernel
in float32); log-weights ``(N,)`` in float64, the kernel's own precision, unrounded; each
factor's record names the first revision its replies came from (``revision``) and all of them
in the order first seen (``revisions``; two: the model was hot-swapped during the job).

Jobs. At most ``max_jobs`` run at once, each in its own thread; up to ``max_queued`` more wait
in order for a slot (RESOURCE_EXHAUSTED on ``request`` beyond), and a job's slot passes to the
next one the moment its thread ends (a cancelled job ends between two expert calls).
Before anything is allocated, ``num_particles × prod(sample_shape)`` is capped by
``max_elements`` and the job's estimated working set (:func:`job_bytes`) by ``max_job_bytes``
(RESOURCE_EXHAUSTED on ``settings.num_particles``), ``num_steps`` by ``max_levels``
(on ``settings.num_steps``), factor and source names by ``MAX_NAME_CHARS``. Cancelling the
stream (the client cancels or disconnects) stops the job (unless the request set ``detach``):
the experts' calls in flight are cancelled, no further call is made, the sampler's
generator is closed and every condition handle is released. At most ``MAX_PENDING_EVENTS``
level events wait for each slow reader; later ones are dropped (a slow client loses previews,
the service no memory); the result always comes.

Jobs by id. The first message of a ``Generate`` stream is the job's ``JobStatus`` with its id
(``request.job_id``, or a random UUID; an id in use is ALREADY_EXISTS on ``job_id``).
``Attach`` subscribes to a running job's messages (its end never cancels the job) or returns
an ended job's result or error; ``GetJob``, ``ListJobs``; ``CancelJob`` takes a queued job
out of the queue or stops a running one and waits up to a second for it to leave its expert
call, so its slot is free when it answers; the streams of a cancelled job end CANCELLED on
``job_id``. Every job's request, status, result and, after each level, its
:class:`~poegen.kernel.sampler.Checkpoint` go to the job store (``job_store``: a folder,
:class:`~poegen.kernel.jobs.DirectoryJobStore`; None: memory, no checkpoints). A host started
on a store resumes each job it finds unfinished from its last checkpoint before it serves
(``resumes`` counts it; the result equals the uninterrupted run's bit for bit); a shutdown
stops running jobs after the grace with their checkpoints kept and ends their streams
UNAVAILABLE. Ended jobs are kept ``job_retention_s``, at most ``max_kept_jobs`` of them.

Errors (a ``google.rpc.BadRequest`` naming the field, see :mod:`poegen.kernel.errors`):

* INVALID_ARGUMENT for a bad request: ``"factors"``, ``"factors[1].address"``,
  ``"factors[0].region.shape"``, ``"sample_shape"``, ``"settings.num_particles"``, ... and the
  kernel's own checks (``"settings.mcmc"``: MALA with an expert without log_prob);
* an address the sampler may not call (see :func:`_check_address`: by default a host:port on
  loopback; ``allowed_experts`` lists others, ``'*'`` opens any host:port; ``unix:`` only when
  listed) → PERMISSION_DENIED on ``factors[i].address``, before anything is dialled; the
  ``expert_token`` needs ``allowed_experts``, so it goes only to listed experts;
* from an expert, named ``factors[i]``: unreachable, too slow, or cancelling the call itself
  (a host shutting down) → UNAVAILABLE on ``factors[i].address`` (the transport's detail only
  in the log); its INVALID_ARGUMENT / RESOURCE_EXHAUSTED pass through (the reason quotes the
  expert's field); a refused token → FAILED_PRECONDITION; a handle lost twice →
  ABORTED (retry the job); anything else → FAILED_PRECONDITION quoting the expert's status;
* every particle died (constraints unsatisfiable) → FAILED_PRECONDITION on ``factors``;
* an expert answered NaN or infinite velocities or scores (or NaN / +inf log-densities) →
  FAILED_PRECONDITION on ``factors[i]``, the job stops;
* our own bugs → INTERNAL (traceback to the log).

:func:`create_sampler_server` wires the servicer with health (``""`` and
``poegen.v1.SamplerService``), reflection, TLS and the bearer-token interceptor, all from
:mod:`poegen.kernel.transport` (shared with the expert host; the kernel imports nothing from
``poegen.expert_servers``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import itertools
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from poegen.kernel import codec, tracing
from poegen.kernel.calls import NonFiniteOutputError
from poegen.kernel.crop import check_window
from poegen.kernel.errors import maps_errors
from poegen.kernel.experts import Capability, KernelError
from poegen.kernel.jobs import (
    JOB_ID,
    DirectoryJobStore,
    JobStore,
    JobStoreError,
    MemoryJobStore,
    decode_checkpoint,
    encode_checkpoint,
)
from poegen.kernel.potentials import AllParticlesDiedError
from poegen.kernel.refusal import Code, ExpertError
from poegen.kernel.remote import RemoteExpertError
from poegen.kernel.replicas import ConnectedExpert, connect_expert, is_replica_target, parse_target
from poegen.kernel.sampler import Checkpoint, LevelTrace, SampleResult, sample_iter
from poegen.kernel.service_metrics import SamplerMetrics
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.kernel.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_GRPC_LIMIT,
    KeepaliveConfig,
    TLSConfig,
    TokenInterceptor,
    add_service,
    bind,
    channel_credentials,
    format_address,
    server_options,
    tune_allocator,
)
from poegen.v1 import expert_pb2, sampler_pb2, sampler_pb2_grpc
from poegen.v1.sampler_pb2 import JobState

logger = logging.getLogger(__name__)

_SERVICE = sampler_pb2.DESCRIPTOR.services_by_name["SamplerService"]
SERVICE_NAME = _SERVICE.full_name
_SETTINGS_FIELDS = frozenset(SamplerSettings.model_fields)
_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})"
)
_SERVING = health_pb2.HealthCheckResponse.SERVING
MAX_NAME_CHARS = 256  # factor and source names (each level event repeats the factor names)
MAX_PENDING_EVENTS = 64  # level events waiting for a slow reader; later ones are dropped
_STOP_WAIT_S = 5.0  # after the grace: for stopped jobs to leave their expert call, streams to end
_CANCEL_WAIT_S = 1.0  # CancelJob waits this long for the job to leave its expert call
_CODES = {code.value: code for code in Code}


class SamplerServerConfig(BaseModel):
    """Settings of the sampler service (YAML section ``sampler:``; CLI flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="bind address")
    port: int = Field(0, ge=0, le=65535, description="bind port; 0 picks a free one")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=MAX_GRPC_LIMIT)
    keepalive: KeepaliveConfig = Field(default_factory=KeepaliveConfig)
    grace_s: float = Field(10.0, ge=0, description="drain time for running jobs on shutdown")
    tls: TLSConfig | None = None
    token: SecretStr | None = Field(None, description="bearer token every RPC but health needs")
    max_jobs: int = Field(4, ge=1, le=1024, description="jobs running at once")
    max_queued: int = Field(
        16, ge=0, le=65536, description="jobs waiting for a slot; beyond: RESOURCE_EXHAUSTED"
    )
    max_elements: int = Field(1 << 26, ge=1, description="cap on num_particles × prod(S)")
    max_levels: int = Field(10_000, ge=1, description="cap on settings.num_steps")
    max_evaluations: int = Field(
        1_000_000,
        ge=1,
        description="cap on a job's evaluations per particle: "
        "num_steps × (1 + mcmc_steps × leapfrog_steps)",
    )
    max_job_bytes: int = Field(
        8 << 30, ge=1 << 20, description="cap on a job's estimated working set (job_bytes)"
    )
    allowed_experts: tuple[str, ...] = Field(
        (),
        description="expert addresses a request may name; empty: host:port on loopback only; "
        "'*': any host:port (never a unix: path unless listed)",
    )
    expert_token: SecretStr | None = Field(None, description="bearer token sent to experts")
    expert_ca_file: Path | None = Field(
        None, description="PEM CA bundle: call experts over TLS, trusting these roots"
    )
    expert_cert_file: Path | None = Field(
        None, description="PEM certificate the sampler presents to mTLS experts (with its key)"
    )
    expert_key_file: Path | None = Field(None, description="PEM key of expert_cert_file")
    expert_deadline_s: float = Field(60.0, gt=0, description="deadline of each expert call")
    expert_retries: int = Field(
        5, ge=0, le=100, description="retries of UNAVAILABLE without expert_outage_s; 0: none"
    )
    expert_outage_s: float | None = Field(
        60.0,
        gt=0,
        description="how long a job keeps retrying an expert that answered before and is now "
        "down (UNAVAILABLE), from its first failed call; None: expert_retries retries",
    )
    shared_memory: bool = Field(False, description="send tensors to co-located experts via shm")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="bind address of /metrics")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="/metrics port; 0: free")
    tracing: bool = Field(
        False, description="OpenTelemetry spans for every RPC and expert call (kernel.tracing)"
    )
    job_store: Path | None = Field(
        None,
        description="folder of the job store (requests, per-level checkpoints, results): a "
        "restarted Sampler resumes its jobs from it; None: jobs live in memory only",
    )
    job_retention_s: float = Field(
        3600.0, gt=0, description="how long an ended job's status and result are kept"
    )
    max_kept_jobs: int = Field(
        256, ge=1, le=1_000_000, description="ended jobs kept at most (oldest dropped first)"
    )

    @model_validator(mode="after")
    def _check_tokens(self) -> SamplerServerConfig:
        tracing.check(self.tracing)
        for name in ("token", "expert_token"):
            secret = getattr(self, name)
            if secret is not None and not secret.get_secret_value().strip():
                raise ValueError(f"{name}: must not be empty (unset it to turn auth off)")
        if (self.expert_cert_file is None) != (self.expert_key_file is None):
            raise ValueError("expert_cert_file: expert_cert_file and expert_key_file go together")
        for name in ("expert_ca_file", "expert_cert_file", "expert_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: not a file")
        if self.expert_token is not None and (
            not self.allowed_experts or "*" in self.allowed_experts
        ):
            # the token goes with every expert call: only to addresses someone configured
            raise ValueError("expert_token: needs allowed_experts listing the experts' addresses")
        return self


@dataclass(frozen=True, slots=True)
class LinkPlan:
    """Condition tensor ``tensor`` := output ``output`` of the Render of ``source``."""

    tensor: str
    source: str
    output: str


@dataclass(frozen=True, slots=True)
class FactorPlan:
    """One factor of a job, validated: where, with what weight, condition and region."""

    address: str
    weight: float
    condition: Any | None  # poegen.v1.Condition
    region: torch.Tensor | None
    name: str | None
    links: tuple[LinkPlan, ...] = ()
    crop: tuple[tuple[int, int], ...] | None = None
    parents: tuple[tuple[str, float], ...] = ()  # a conditional expert's parents and pulls


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """An expert that only renders conditions for links."""

    name: str
    address: str
    condition: Any | None  # poegen.v1.Condition


@dataclass(frozen=True, slots=True)
class JobPlan:
    """A validated ``GenerateRequest``."""

    factors: tuple[FactorPlan, ...]
    sample_shape: tuple[int, ...]
    settings: SamplerSettings
    seed: int
    preview: bool
    sources: tuple[SourcePlan, ...] = ()
    waves: tuple[tuple[int, ...], ...] = ()  # factor indices, in link-dependency order


# --------------------------------------------------------------------------- request


def parse_request(request: sampler_pb2.GenerateRequest, config: SamplerServerConfig) -> JobPlan:
    """Validate a ``GenerateRequest``; ``ExpertError`` naming the field otherwise."""
    if not request.factors:
        raise ExpertError.invalid("factors", "at least one factor is needed")
    shape = tuple(int(s) for s in request.sample_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ExpertError.invalid("sample_shape", f"needs positive dimensions, got {list(shape)}")
    settings = settings_from_proto(request.settings)
    elements = settings.num_particles * math.prod(shape)
    if elements > config.max_elements:
        raise ExpertError.resource_exhausted(
            "settings.num_particles",
            f"num_particles × prod(sample_shape) = {elements} is over the limit of "
            f"{config.max_elements}",
        )
    if settings.num_steps > config.max_levels:
        raise ExpertError.resource_exhausted(
            "settings.num_steps", f"{settings.num_steps} levels; the limit is {config.max_levels}"
        )
    leapfrog = settings.leapfrog_steps if settings.mcmc in ("hmc", "uhmc") else 1
    evaluations = settings.num_steps * (1 + settings.mcmc_steps * leapfrog)
    if evaluations > config.max_evaluations:
        raise ExpertError.resource_exhausted(
            "settings.mcmc_steps",
            f"num_steps × (1 + mcmc_steps × leapfrog_steps) = {evaluations} evaluations per "
            f"particle; the limit is {config.max_evaluations}",
        )
    estimate = job_bytes(elements, len(request.factors))
    if estimate > config.max_job_bytes:
        raise ExpertError.resource_exhausted(
            "settings.num_particles",
            f"the job would hold about {estimate / 2**30:.1f} GiB "
            f"({len(request.factors)} factors); the limit is {config.max_job_bytes / 2**30:.1f} GiB",
        )
    factors = tuple(_parse_factor(i, f, shape, config) for i, f in enumerate(request.factors))
    sources = tuple(_parse_source(j, s, config) for j, s in enumerate(request.sources))
    waves = link_waves(factors, sources)
    return JobPlan(
        factors, shape, settings, int(request.seed), bool(request.preview), sources, waves
    )


def job_bytes(elements: int, factors: int) -> int:
    """Estimated peak working set of a job: 4 bytes × N·prod(S) × (16 + 8·F).

    The particles, their proposals and MCMC copies (about 16 float32 tensors of N·prod(S)), and
    per factor its outputs, their chunks and the combined score (about 8); calibrated on one
    measurement (N·prod(S) = 2^24, one factor: 1.65 GB resident).
    """
    return 4 * elements * (16 + 8 * factors)


def _check_name(where: str, name: str) -> str:
    # names travel back in every level event: keep them short
    if len(name) > MAX_NAME_CHARS:
        raise ExpertError.invalid(where, f"{len(name)} characters; at most {MAX_NAME_CHARS}")
    return name


def _check_address(where: str, address: str, config: SamplerServerConfig) -> str:
    """``address`` if this sampler may call it: listed in ``allowed_experts``; with no list, a
    host:port on loopback; with ``'*'``, any host:port. Anything else (a ``unix:`` path, a
    target with a scheme, a host the list does not name) is PERMISSION_DENIED, before dialling.
    A list of replicas (``ipv4:``/``ipv6:``) passes only when listed whole or when every replica
    would pass alone; a ``dns:`` target only when listed (its addresses are not known yet)."""
    address = address.strip()
    if is_replica_target(address):
        return _check_replicas(where, address, config)
    if address in config.allowed_experts:
        return address
    host = _host_of(address)
    if host is None and ":" not in address:
        raise ExpertError.invalid(f"{where}.address", "needs host:port of an ExpertService")
    if host is None:  # a target with a scheme: unix:, unix-abstract:, dns:, ipv4:, ...
        raise ExpertError.permission_denied(
            f"{where}.address", "only host:port targets, unless allowed_experts lists it"
        )
    open_to_any = "*" in config.allowed_experts
    if not (open_to_any or (not config.allowed_experts and _is_loopback(host))):
        raise ExpertError.permission_denied(
            f"{where}.address", "not among the expert addresses this sampler may call"
        )
    return address


def _check_replicas(where: str, address: str, config: SamplerServerConfig) -> str:
    try:
        target = parse_target(address)
    except ValueError as e:
        raise ExpertError.invalid(f"{where}.address", str(e)) from None
    if address in config.allowed_experts:
        return address
    if target.scheme == "dns":
        raise ExpertError.permission_denied(
            f"{where}.address", "a dns: target only when allowed_experts lists it"
        )
    for member in target.members:
        try:
            _check_address(where, member, config)
        except ExpertError as e:
            raise ExpertError(e.code, e.field, f"replica {member}: {e.reason}") from None
    return address


def _host_of(address: str) -> str | None:
    """The host of ``host:port`` / ``[v6]:port``; None for anything else (schemes, paths)."""
    match = _HOST_PORT.fullmatch(address)
    if match is None:
        return None
    return match.group("v6") or match.group("host")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_source(
    j: int, spec: sampler_pb2.ConditionSource, config: SamplerServerConfig
) -> SourcePlan:
    where = f"sources[{j}]"
    if not spec.name.strip():
        raise ExpertError.invalid(f"{where}.name", "required: links refer to sources by name")
    _check_name(f"{where}.name", spec.name)
    address = _check_address(where, spec.address, config)
    condition = spec.condition if spec.HasField("condition") else None
    return SourcePlan(spec.name.strip(), address, condition)


def _parse_links(where: str, spec: sampler_pb2.FactorSpec) -> tuple[LinkPlan, ...]:
    links, tensors = [], set()
    for k, link in enumerate(spec.links):
        for field in ("tensor", "source", "output"):
            if not getattr(link, field).strip():
                raise ExpertError.invalid(f"{where}.links[{k}].{field}", "required")
        if link.tensor in tensors:
            raise ExpertError.invalid(f"{where}.links[{k}].tensor", f"{link.tensor!r} linked twice")
        tensors.add(link.tensor)
        links.append(LinkPlan(link.tensor, link.source.strip(), link.output))
    return tuple(links)


def link_waves(
    factors: Sequence[FactorPlan], sources: Sequence[SourcePlan]
) -> tuple[tuple[int, ...], ...]:
    """Factor indices grouped so every factor comes after the factors it links to.

    Raises ``ExpertError`` for duplicate names, links to nothing or to themselves, and cycles.
    """
    owner: dict[str, str] = {}
    for where, name in [(f"sources[{j}]", s.name) for j, s in enumerate(sources)] + [
        (f"factors[{i}]", f.name) for i, f in enumerate(factors) if f.name
    ]:
        if name in owner:
            raise ExpertError.invalid(f"{where}.name", f"{name!r} also names {owner[name]}")
        owner[name] = where
    index = {f.name: i for i, f in enumerate(factors) if f.name}
    needs: list[set[int]] = []
    for i, f in enumerate(factors):
        deps = set()
        for k, link in enumerate(f.links):
            if link.source not in owner:
                raise ExpertError.invalid(
                    f"factors[{i}].links[{k}].source", f"no factor or source named {link.source!r}"
                )
            if owner[link.source] == f"factors[{i}]":
                raise ExpertError.invalid(f"factors[{i}].links[{k}].source", "links to itself")
            if link.source in index:
                deps.add(index[link.source])
        needs.append(deps)
    waves, done = [], set()
    while len(done) < len(factors):
        wave = tuple(i for i in range(len(factors)) if i not in done and needs[i] <= done)
        if not wave:
            stuck = min(set(range(len(factors))) - done)
            raise ExpertError.invalid(f"factors[{stuck}].links", "the links form a cycle")
        waves.append(wave)
        done |= set(wave)
    return tuple(waves)


def _parse_factor(
    i: int, spec: sampler_pb2.FactorSpec, shape: tuple[int, ...], config: SamplerServerConfig
) -> FactorPlan:
    where = f"factors[{i}]"
    address = _check_address(where, spec.address, config)
    weight = spec.weight if spec.HasField("weight") else 1.0
    if not math.isfinite(weight):
        raise ExpertError.invalid(f"{where}.weight", "must be finite")
    region = None
    if spec.HasField("region"):
        region = codec.decode(
            spec.region, field=f"{where}.region", max_bytes=config.max_message_bytes
        )
        if tuple(region.shape) != shape:
            raise ExpertError.invalid(
                f"{where}.region.shape", f"{list(region.shape)}, expected {list(shape)}"
            )
        region = region.to(torch.float32, copy=True)
        if not bool(torch.isfinite(region).all()):
            raise ExpertError.invalid(f"{where}.region", "must be finite (no NaN or inf)")
    condition = spec.condition if spec.HasField("condition") else None
    _check_name(f"{where}.name", spec.name)
    crop = None
    if spec.crop:
        spans = tuple((int(s.start), int(s.stop)) for s in spec.crop)
        try:
            crop = check_window(spans, shape, f"{where}.crop")
        except KernelError as e:
            raise ExpertError.invalid(e.field, e.reason) from None
    parents = []
    for parent, pull in sorted(spec.parents.items()):
        _check_name(f"{where}.parents", parent)
        if not parent:
            raise ExpertError.invalid(f"{where}.parents", "a parent needs a name")
        if not math.isfinite(pull) or pull <= 0:
            raise ExpertError.invalid(f"{where}.parents[{parent}]", "must be finite and > 0")
        parents.append((parent, float(pull)))
    return FactorPlan(
        address, float(weight), condition, region, spec.name or None,
        _parse_links(where, spec), crop, tuple(parents),
    )  # fmt: skip


def settings_from_proto(msg: sampler_pb2.SamplerSettings) -> SamplerSettings:
    """``SamplerSettings`` from the wire: unset fields take the preset's defaults."""
    values: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        name = field.name
        if name in ("sigmas", "preset") or not msg.HasField(name):
            continue
        values[name] = getattr(msg, name)
    if values.get("max_batch") == 0:
        values["max_batch"] = None
    if msg.sigmas:
        values["sigmas"] = tuple(msg.sigmas)
    preset = msg.preset if msg.HasField("preset") else "default"
    if preset not in ("default", "paper"):
        raise ExpertError.invalid("settings.preset", f"unknown preset {preset!r} (default, paper)")
    try:
        return SamplerSettings.preset(preset, **values)
    except ValidationError as e:
        error = e.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(p) for p in error["loc"])
        raise ExpertError.invalid(f"settings.{loc}" if loc else "settings", error["msg"]) from None


# --------------------------------------------------------------------------- replies


def level_event(trace: LevelTrace, *, preview: bool) -> sampler_pb2.GenerateResponse:
    """The ``LevelEvent`` of one level."""
    event = sampler_pb2.LevelEvent(
        step=trace.step,
        sigma=trace.sigma,
        ess=trace.ess,
        resampled=trace.resampled,
        acceptance_rate=trace.acceptance,
        log_weight_spread=trace.log_weight_spread,
        reward_scale=trace.reward_scale,
        log_evidence=trace.log_evidence,
        timings=[
            sampler_pb2.ExpertTiming(
                name=name,
                calls=stats.calls,
                seconds=stats.seconds,
                samples=stats.samples,
                vjp_samples=stats.vjp_samples,
            )
            for name, stats in trace.experts.items()
        ],
    )
    if preview:
        event.preview.CopyFrom(codec.encode(trace.preview))
    return sampler_pb2.GenerateResponse(level=event)


def generate_result(
    result: SampleResult,
    factors: Sequence[Factor],
    experts: Sequence[ConnectedExpert],
    before: Sequence[Sequence[str]] = (),
) -> sampler_pb2.GenerateResponse:
    """The ``GenerateResult``; expert records in factor order with the revisions seen (after
    ``before``, those seen before a resume)."""
    records = []
    for factor, expert, revisions in zip(factors, experts, _revisions(experts, before),
                                         strict=True):  # fmt: skip
        info = expert.describe()
        revisions = revisions or (info.revision,)
        records.append(
            sampler_pb2.ExpertRecord(
                name=factor.name or info.name,
                model_id=info.model_id,
                revision=revisions[0],
                revisions=revisions,
            )
        )
    out = sampler_pb2.GenerateResult(
        particles=codec.encode(result.particles),
        log_weights=codec.encode(result.log_weights),
        log_evidence=result.log_evidence,
        best_index=result.best_index,
        experts=records,
        transition=result.transition,
    )
    return sampler_pb2.GenerateResponse(result=out)


def _revisions(
    experts: Sequence[ConnectedExpert], before: Sequence[Sequence[str]]
) -> list[tuple[str, ...]]:
    """Each factor's distinct revisions, first seen first: those ``before`` a resume, then
    those seen since."""
    merged = []
    for i, expert in enumerate(experts):
        seen = list(before[i]) if i < len(before) else []
        seen.extend(r for r in expert.revisions_seen if r not in seen)
        merged.append(tuple(seen))
    return merged


# --------------------------------------------------------------------------- jobs


_END = object()
_ENDED = frozenset({JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED,
                    JobState.JOB_STATE_CANCELLED})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a job goes on after its Sampler stopped: a level's checkpoint (None: from the
    start, the same seed gives the same run), the revisions seen before, resumes so far, and
    when the job was first submitted."""

    checkpoint: Checkpoint | None
    revisions: tuple[tuple[str, ...], ...]
    resumes: int
    created_at: float


class Job:
    """One ``Generate`` run in its own thread, feeding the asyncio queues of its subscribers.

    Each subscriber's queue receives ``GenerateResponse`` messages, then either an exception
    (the job's error, mapped by :func:`job_error`) or nothing, then the end marker. After
    every level the job writes its checkpoint to ``store`` (when the store is durable); at its
    end, its status and result. :meth:`stop` (any thread) stops the run between two expert
    calls: ``"cancelled"`` ends it CANCELLED, ``"shutdown"`` leaves it RUNNING in the store
    with its checkpoint, for the next Sampler on the store to resume.
    """

    def __init__(
        self,
        plan: JobPlan,
        config: SamplerServerConfig,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[Job], None],
        number: int,
        metrics: SamplerMetrics | None = None,
        *,
        job_id: str = "",
        store: JobStore | None = None,
        resume: Resume | None = None,
    ) -> None:
        self.plan = plan
        self.job_id = job_id or f"local-{number}"
        self._metrics = metrics
        self._store = store
        self._resume = resume
        self._subscribers: list[asyncio.Queue[Any]] = []
        self.outcome: Any = None  # the result response or the error, once ended (on the loop)
        self.delivered = False  # the end marker reached the subscribers (on the loop)
        self._config = config
        self._loop = loop
        self._on_done = on_done
        self._stop = threading.Event()
        self._stop_reason = "cancelled"
        self._lock = threading.Lock()
        self._experts: list[ConnectedExpert] = []
        self._started = False
        self.finished = threading.Event()
        self.dropped_events = 0  # level events slow readers did not get (see _emit_level)
        # written by the job thread, read by the loop: through a lock, readers get copies
        self._status_lock = threading.Lock()
        self._status = sampler_pb2.JobStatus(
            job_id=self.job_id, state=JobState.JOB_STATE_QUEUED,
            created_at=resume.created_at if resume else time.time(),
            resumes=resume.resumes if resume else 0,
            levels_done=resume.checkpoint.levels_done if resume and resume.checkpoint else 0,
        )  # fmt: skip
        # the job thread computes with the service thread's torch thread count (calls.worker_pool)
        self._torch_threads = torch.get_num_threads()
        # made in the Generate handler: its trace context is the request's (kernel.tracing)
        self._trace_context = tracing.current(config.tracing)
        self._thread = threading.Thread(target=self._main, name=f"poegen-job-{number}", daemon=True)

    # ------------------------------------------------------------------ subscribers (loop)

    def subscribe(self) -> asyncio.Queue[Any]:
        """A queue of this job's messages from now on (call on the job's loop)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def _fan_out(self, item: Any, *, droppable: bool) -> None:
        if item is _END:
            self.delivered = True  # from now on a subscriber would wait forever
        elif not droppable:
            self.outcome = item
        for queue in self._subscribers:
            if droppable and queue.qsize() >= MAX_PENDING_EVENTS:
                self.dropped_events += 1
            else:
                queue.put_nowait(item)

    def _emit(self, item: Any, *, droppable: bool = False) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(functools.partial(self._fan_out, item,
                                                              droppable=droppable))  # fmt: skip

    def _emit_level(self, event: sampler_pb2.GenerateResponse) -> None:
        """A level event, dropped for a reader ``MAX_PENDING_EVENTS`` behind: a slow client
        loses previews, the service never holds more of them (the result always comes)."""
        self._emit(event, droppable=True)

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        self._started = True
        self._update_status(state=JobState.JOB_STATE_RUNNING)
        self.save_status()
        self._thread.start()

    def stop(self, reason: str = "cancelled") -> None:
        """Stop the run: cancel the experts' calls in flight, make no more. ``reason``:
        ``"cancelled"`` (ends CANCELLED) or ``"shutdown"`` (stays resumable)."""
        self._stop_reason = reason
        self._stop.set()
        with self._lock:
            experts = list(self._experts)
        for expert in experts:
            expert.cancel()

    def drop_unstarted(self, reason: str, error: BaseException | None = None) -> None:
        """End a job that never got a slot (cancelled in the queue, or the Sampler stops)."""
        self._stop_reason = reason
        self._stop.set()
        if reason == "cancelled":
            self._end(JobState.JOB_STATE_CANCELLED)
            error = self.cancelled()
        if error is not None:
            self._emit(error)
        self._emit(_END)
        self.finished.set()

    def cancelled(self) -> ExpertError:
        """What the job's streams end with once it is cancelled."""
        return ExpertError(Code.CANCELLED, "job_id", f"job {self.job_id} was cancelled")

    def join(self, timeout: float | None = None) -> bool:
        if not self._started:
            return self.finished.is_set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _main(self) -> None:
        torch.set_num_threads(self._torch_threads)
        outcome: Any = None
        try:
            outcome = self._run()
        except BaseException as e:
            outcome = job_error(e, self.plan)
        finally:
            with self._lock:
                experts, self._experts = self._experts, []
            for expert in experts:
                expert.close()  # releases its handle before the client hears the end
            if self._metrics is not None:
                self._metrics.job_finished(self._outcome(outcome))
            outcome = self._finish(outcome)
            self._on_done(self)
            if outcome is not None:
                self._emit(outcome)
            self._emit(_END)
            self.finished.set()

    def _outcome(self, outcome: Any) -> str:
        if isinstance(outcome, sampler_pb2.GenerateResponse):
            return "completed"
        if outcome is None or self._stop.is_set():
            return "stopped"  # cancelled, the client left, or shutdown
        return "failed"

    def _finish(self, outcome: Any) -> Any:
        """Record the end in the store; the outcome the subscribers get."""
        if isinstance(outcome, sampler_pb2.GenerateResponse):
            self._put("result", outcome.result.SerializeToString())
            self._end(JobState.JOB_STATE_SUCCEEDED)
        elif self._stop.is_set() and self._stop_reason == "shutdown":
            # left RUNNING with its checkpoint: the next Sampler on this store resumes it
            return ExpertError.unavailable(
                "request", f"the sampler is shutting down; job {self.job_id} goes on when it "
                "restarts on the same job store (Attach to it then)",
            )  # fmt: skip
        elif self._stop.is_set() or outcome is None:
            self._end(JobState.JOB_STATE_CANCELLED)
            return self.cancelled()
        else:
            code = getattr(outcome, "code", Code.INTERNAL)
            self._update_status(
                error_code=code.value,
                error_field=getattr(outcome, "field", ""),
                error_message=getattr(outcome, "reason", "internal error"),
            )
            self._end(JobState.JOB_STATE_FAILED)
        return outcome

    def _end(self, state: int) -> None:
        self._update_status(state=state, ended_at=time.time())
        self.save_status()
        if self._store is not None:
            self._store.discard(self.job_id, "checkpoint")

    def _put(self, record: str, data: bytes) -> None:
        if self._store is not None:
            self._store.put(self.job_id, record, data)

    @property
    def status(self) -> sampler_pb2.JobStatus:
        """A copy of the job's status (the job thread updates it as it goes)."""
        copy = sampler_pb2.JobStatus()
        with self._status_lock:
            copy.CopyFrom(self._status)
        return copy

    def _update_status(self, **fields: Any) -> None:
        with self._status_lock:
            for name, value in fields.items():
                setattr(self._status, name, value)

    def save_status(self) -> None:
        with self._status_lock:
            data = self._status.SerializeToString()
        self._put("status", data)

    def _run(self) -> sampler_pb2.GenerateResponse | None:
        """Run the sampler, emitting level events; the result, or None when stopped."""
        experts = self._connect()
        plan = self.plan
        factors = [
            Factor(
                expert,
                weight=f.weight,
                region=f.region,
                name=f.name,
                crop=f.crop,
                parents=dict(f.parents),
            )
            for f, expert in zip(plan.factors, experts, strict=True)
        ]
        generator = torch.Generator().manual_seed(plan.seed)
        resume = self._resume.checkpoint if self._resume else None
        before = self._resume.revisions if self._resume else ()
        run = sample_iter(factors, plan.sample_shape, plan.settings, generator=generator,
                          resume=resume)  # fmt: skip
        checkpoints = self._store is not None and self._store.durable
        try:
            while not self._stop.is_set():
                try:
                    trace = next(run)
                except StopIteration as done:
                    return generate_result(done.value, factors, experts, before)
                except NonFiniteOutputError as e:
                    index = next(i for i, f in enumerate(factors) if f is e.factor)
                    raise ExpertError.failed_precondition(f"factors[{index}]", str(e)) from None
                if checkpoints and trace.checkpoint is not None:
                    seen = _revisions(experts, before)
                    self._put("checkpoint", encode_checkpoint(trace.checkpoint, seen))
                self._update_status(levels_done=trace.step + 1, levels=trace.levels)
                if self._metrics is not None:
                    self._metrics.level_done(trace.experts)
                self._emit_level(level_event(trace, preview=plan.preview))
        finally:
            run.close()
        return None

    def _connect(self) -> list[ConnectedExpert]:
        """Connect the sources, then the factors wave by wave with their links resolved.

        Returns the factors' experts in factor order (sources are only closed at the end).
        """
        plan = self.plan
        where = [f"sources[{j}]" for j in range(len(plan.sources))]
        sources = self._connect_all(
            [(w, s.address, s.condition) for w, s in zip(where, plan.sources, strict=True)]
        )
        providers = {s.name: (w, e) for s, w, e in zip(plan.sources, where, sources, strict=True)}
        experts: list[ConnectedExpert | None] = [None] * len(plan.factors)
        renders: dict[tuple[str, str], torch.Tensor] = {}  # each (source, output) once per job
        for wave in plan.waves or (tuple(range(len(plan.factors))),):
            items = [
                (f"factors[{i}]", plan.factors[i].address, self._condition(i, providers, renders))
                for i in wave
            ]
            for i, expert in zip(wave, self._connect_all(items), strict=True):
                experts[i] = expert
                if plan.factors[i].name:
                    providers[plan.factors[i].name] = (f"factors[{i}]", expert)
        connected = [e for e in experts if e is not None]
        if self._stop.is_set():
            for expert in connected:
                expert.cancel()
        return connected

    def _condition(
        self,
        i: int,
        providers: dict[str, tuple[str, ConnectedExpert]],
        renders: dict[tuple[str, str], torch.Tensor],
    ) -> Any | None:
        """Factor i's condition with its linked tensors filled in from their Renders."""
        factor = self.plan.factors[i]
        if not factor.links:
            return factor.condition
        condition = expert_pb2.Condition()
        if factor.condition is not None:
            condition.CopyFrom(factor.condition)
        for k, link in enumerate(factor.links):
            key = (link.source, link.output)
            if key not in renders:
                renders[key] = self._render(
                    f"factors[{i}].links[{k}]", link, *providers[link.source]
                )
            condition.tensors[link.tensor].CopyFrom(codec.encode(renders[key]))
        return condition

    @staticmethod
    def _render(where: str, link: LinkPlan, owner: str, expert: ConnectedExpert) -> torch.Tensor:
        if not expert.describe().supports(Capability.RENDER):
            raise ExpertError.invalid(f"{where}.source", f"{link.source!r} renders nothing")
        try:
            return expert.render([link.output])[link.output]
        except RemoteExpertError as e:
            if e.code == Code.INVALID_ARGUMENT and e.field == "names":
                raise ExpertError.invalid(f"{where}.output", e.reason) from None
            raise _FactorError(None, e, where=owner) from None

    def _connect_all(self, items: Sequence[tuple[str, str, Any | None]]) -> list[ConnectedExpert]:
        """Connect ``(where, address, condition)`` experts concurrently; a failure raises
        ``_FactorError`` naming its ``where`` (those connected are closed by ``_main``)."""
        if not items:
            return []
        config = self._config
        token = config.expert_token.get_secret_value() if config.expert_token else None
        tls = (
            channel_credentials(
                config.expert_ca_file,
                cert_file=config.expert_cert_file,
                key_file=config.expert_key_file,
            )
            if config.expert_ca_file or config.expert_cert_file
            else None
        )

        def connect(where: str, address: str, condition: Any | None) -> ConnectedExpert:
            if self._stop.is_set():
                raise RemoteExpertError(
                    Code.CANCELLED, "", "job stopped", method="Describe",
                    address=address,
                )  # fmt: skip
            expert = connect_expert(  # a RemoteExpert, or a ReplicatedExpert for a replica list
                address,
                condition=condition,
                token=token,
                tls=tls,
                deadline_s=config.expert_deadline_s,
                retries=config.expert_retries,
                outage_s=config.expert_outage_s if config.expert_retries else None,
                jitter_seed=_jitter_seed(where),
                shared_memory=config.shared_memory,
                max_message_bytes=config.max_message_bytes,
                tracing=config.tracing,
                trace_context=self._trace_context,
            )
            with self._lock:
                self._experts.append(expert)  # closed by _main whatever happens next
            return expert

        with ThreadPoolExecutor(len(items), thread_name_prefix="poegen-connect") as pool:
            futures = [pool.submit(connect, *item) for item in items]
            errors = [f.exception() for f in futures]
        for (where, _, _), error in zip(items, errors, strict=True):
            if error is not None:
                index = int(where[8:-1]) if where.startswith("factors[") else None
                raise _FactorError(index, error, where=where)
        return [f.result() for f in futures]


def _jitter_seed(where: str) -> int:
    """Factor i keeps seed i (as before links); sources take 1_000_000 + j."""
    number = int(where[where.index("[") + 1 : -1])
    return number if where.startswith("factors[") else 1_000_000 + number


class _FactorError(Exception):
    """An error while connecting factor ``index`` (or the source ``where`` names)."""

    def __init__(self, index: int | None, error: BaseException, *, where: str = "") -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error
        self.where = where or f"factors[{index}]"


def job_error(error: BaseException, plan: JobPlan) -> BaseException:
    """The status a failed job answers with (see the module docstring)."""
    if isinstance(error, _FactorError):
        inner = error.error
        if isinstance(inner, RemoteExpertError):
            return _expert_error(error.index, inner, connecting=True, where=error.where)
        return inner
    if isinstance(error, RemoteExpertError):
        index = next((i for i, f in enumerate(plan.factors) if f.address == error.address), None)
        return _expert_error(index, error, connecting=False)
    if isinstance(error, AllParticlesDiedError):
        return ExpertError.failed_precondition("factors", str(error))
    if isinstance(error, KernelError):
        return ExpertError.invalid(*_request_field(error))
    if isinstance(error, ValueError | TypeError):  # an expert that broke its contract
        return ExpertError.invalid("factors", str(error))
    return error


def _expert_error(
    index: int | None, err: RemoteExpertError, *, connecting: bool, where: str = ""
) -> ExpertError:
    where = where or (f"factors[{index}]" if index is not None else "factors")
    code = err.code
    quoted = f"expert at {err.address}, {err.method}: {code.name}: {err}"
    # A stopped job never gets here (Job._finish answers CANCELLED first): a CANCELLED call of a
    # running job was cancelled by the expert's side (a server shutting down), i.e. it went away.
    if code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED):
        # the transport's detail (refused, reset, no route) stays in the log: told to the
        # caller it would make the sampler a port scanner
        logger.warning("%s: %s", where, quoted)
        return ExpertError.unavailable(
            f"{where}.address", f"the expert did not answer {err.method} ({code.name})"
        )
    if connecting and code == Code.INVALID_ARGUMENT and err.field.startswith("condition"):
        return ExpertError.invalid(f"{where}.{err.field}", err.reason)
    if code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED):
        return ExpertError(code, where, quoted)
    if code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED):
        return ExpertError.failed_precondition(
            f"{where}.address", f"the expert refused the sampler's credentials ({code.name})"
        )
    if code in (Code.NOT_FOUND, Code.FAILED_PRECONDITION):
        return ExpertError(Code.ABORTED, where, quoted + "; retry the job")
    return ExpertError.failed_precondition(where, quoted)


def _request_field(error: KernelError) -> tuple[str, str]:
    """(request path, reason) of the kernel's ``field``: a setting is under ``settings.``."""
    field = error.field
    if field in _SETTINGS_FIELDS:
        return f"settings.{field}", error.reason
    if field in ("sample_shape", "factors") or field.startswith("factors["):
        return field, error.reason
    return "factors", str(error)  # "weight", "region": a factor named in the reason


class JobSlots:
    """The jobs running now, at most ``max_jobs``, and up to ``max_queued`` jobs waiting, in
    order, for a slot (RESOURCE_EXHAUSTED beyond). A job's slot goes to the next waiting job
    the moment its thread ends. ``submit`` and ``cancel`` run on the service's event loop;
    ``running`` and ``waiting`` anywhere."""

    def __init__(
        self,
        max_jobs: int,
        max_queued: int = 0,
        metrics: SamplerMetrics | None = None,
        on_end: Callable[[Job], None] | None = None,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_queued = max_queued
        self._metrics = metrics
        self._on_end = on_end  # on the loop, after a job's end, before its slot moves on
        self._running: set[Job] = set()
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._count = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def make(
        self,
        plan: JobPlan,
        config: SamplerServerConfig,
        *,
        job_id: str = "",
        store: JobStore | None = None,
        resume: Resume | None = None,
    ) -> Job:
        """A job of this service, not submitted yet (call on the loop)."""
        loop = self._loop = asyncio.get_running_loop()
        return Job(plan, config, loop, self._done, next(self._count), self._metrics,
                   job_id=job_id, store=store, resume=resume)  # fmt: skip

    def submit(self, job: Job, *, resumed: bool = False) -> None:
        """Start ``job`` now if a slot is free, else queue it; a resumed job (accepted before
        its Sampler stopped) is never refused for a full queue."""
        with self._lock:
            if self._closed:
                raise _shutting_down()
            start = len(self._running) < self.max_jobs and not self._waiting
            if start:
                self._running.add(job)
            elif len(self._waiting) >= self.max_queued and not resumed:
                raise ExpertError.resource_exhausted(
                    "request",
                    f"{self.max_jobs} jobs are running and {len(self._waiting)} waiting; "
                    "try again later",
                )
            else:
                self._waiting.append(job)
        if start:
            job.start()
        else:
            job.save_status()  # queued: resumable as it is

    def cancel(self, job: Job) -> None:
        """Stop ``job``: out of the queue at once, or stopped between two expert calls."""
        with self._lock:
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
        if queued:
            job.drop_unstarted("cancelled")
            if self._on_end is not None:
                self._on_end(job)
        else:
            job.stop("cancelled")

    def _done(self, job: Job) -> None:
        # the job's thread, as it ends
        with self._lock:
            self._running.discard(job)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._ended, job)

    def _ended(self, job: Job) -> None:
        if self._on_end is not None:
            self._on_end(job)
        self._hand_over()

    def _hand_over(self) -> None:
        """Start the longest waiting jobs in the free slots (on the event loop)."""
        while True:
            with self._lock:
                if self._closed or not self._waiting or len(self._running) >= self.max_jobs:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
            job.start()

    def close(self) -> list[Job]:
        """Admit no more jobs; the jobs still waiting are returned, unstarted (on the loop)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
        return waiting

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running)


def _shutting_down() -> ExpertError:
    return ExpertError.unavailable("request", "the sampler is shutting down; try another")


# --------------------------------------------------------------------------- servicer


def _job_store(config: SamplerServerConfig) -> JobStore:
    if config.job_store is None:
        return MemoryJobStore()
    return DirectoryJobStore(config.job_store)


class SamplerServicer(sampler_pb2_grpc.SamplerServiceServicer):
    """``SamplerService``: parse → job (queued, then its own thread) → streams; jobs by id
    in the store (see the module docstring)."""

    def __init__(self, config: SamplerServerConfig) -> None:
        self.config = config
        self.metrics = SamplerMetrics()
        self.jobs = JobSlots(config.max_jobs, config.max_queued, self.metrics, self.job_ended)
        self.metrics.track_jobs(lambda: len(self.jobs.running()), self.jobs.waiting)
        self.store = _job_store(config)
        # a durable store writes files: off the event loop, on one thread of its own (the
        # loop's default executor would grow a thread per overlapping call)
        self._store_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poegen-job-store")
        self._live: dict[str, Job] = {}  # queued and running jobs by id (on the loop)
        self._ended: dict[str, sampler_pb2.JobStatus] = {}  # kept ended jobs, oldest first

    # ------------------------------------------------------------------ RPCs

    @maps_errors
    async def Generate(
        self, request: sampler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sampler_pb2.GenerateResponse]:
        plan = parse_request(request, self.config)
        job_id = self._new_id(request.job_id)
        job = self.jobs.make(plan, self.config, job_id=job_id, store=self.store)
        queue = job.subscribe()
        self._live[job_id] = job  # the id is taken before the first await
        try:
            await self._in_store(self.store.put, job_id, "request", request.SerializeToString())
            self.jobs.submit(job)
        except BaseException:
            self._live.pop(job_id, None)
            self.store.delete(job_id)
            raise
        try:
            yield sampler_pb2.GenerateResponse(job=job.status)
            async for item in _stream(queue):
                yield item
        finally:
            job.unsubscribe(queue)
            if not request.detach and not job.delivered:
                self.jobs.cancel(job)  # the client left before the end: cancel the job

    @maps_errors
    async def Attach(
        self, request: sampler_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sampler_pb2.AttachResponse]:
        job_id = _job_id(request.job_id)
        job = self._live.get(job_id)
        if job is not None and not job.delivered:
            queue = job.subscribe()
            try:
                yield sampler_pb2.AttachResponse(job=job.status)
                async for item in _stream(queue):
                    yield _attach_response(item)
            finally:
                job.unsubscribe(queue)
            return
        status = self._status(job_id)
        yield sampler_pb2.AttachResponse(job=status)
        if status.state == JobState.JOB_STATE_SUCCEEDED:
            data = await self._in_store(self.store.get, job_id, "result")
            if data is None:
                raise ExpertError.not_found("job_id", f"job {job_id}: its result is gone")
            yield sampler_pb2.AttachResponse(result=sampler_pb2.GenerateResult.FromString(data))
        elif status.state == JobState.JOB_STATE_FAILED:
            code = _CODES.get(status.error_code, Code.UNKNOWN)
            raise ExpertError(code, status.error_field, status.error_message)
        elif status.state == JobState.JOB_STATE_CANCELLED:
            raise ExpertError(Code.CANCELLED, "job_id", f"job {job_id} was cancelled")

    @maps_errors
    async def GetJob(
        self, request: sampler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.GetJobResponse:
        return sampler_pb2.GetJobResponse(job=self._status(_job_id(request.job_id)))

    @maps_errors
    async def CancelJob(
        self, request: sampler_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.CancelJobResponse:
        job_id = _job_id(request.job_id)
        job = self._live.get(job_id)
        if job is not None and job.status.state not in _ENDED:
            self.jobs.cancel(job)
            # the slot is free once the job leaves its expert call (cancelled in flight)
            await asyncio.to_thread(job.finished.wait, _CANCEL_WAIT_S)
        return sampler_pb2.CancelJobResponse(job=self._status(job_id))

    @maps_errors
    async def ListJobs(
        self, request: sampler_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.ListJobsResponse:
        live = sorted(self._live.values(), key=lambda j: j.status.created_at)
        ended = [s for s in reversed(self._ended.values()) if s.job_id not in self._live]
        return sampler_pb2.ListJobsResponse(jobs=[j.status for j in live] + ended)

    # ------------------------------------------------------------------ jobs

    async def _in_store(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on the store: in its thread when the store is on disk."""
        if not self.store.durable:
            return call(*args)
        return await asyncio.get_running_loop().run_in_executor(self._store_io, call, *args)

    def _new_id(self, requested: str) -> str:
        if not requested:
            return uuid.uuid4().hex
        job_id = _job_id(requested)
        if job_id in self._live or job_id in self._ended or self.store.get(job_id, "status"):
            raise ExpertError(Code.ALREADY_EXISTS, "job_id", f"{job_id!r} is in use")
        return job_id

    def _status(self, job_id: str) -> sampler_pb2.JobStatus:
        job = self._live.get(job_id)
        if job is not None:
            return job.status
        if job_id in self._ended:
            return self._ended[job_id]
        raise ExpertError.not_found("job_id", f"no job {job_id!r} (unknown, or no longer kept)")

    def job_ended(self, job: Job) -> None:
        """On the loop, after a job's end: keep its status, forget the oldest ended ones."""
        if self._live.get(job.job_id) is job:
            del self._live[job.job_id]
        if job.status.state not in _ENDED:
            return  # stopped by a shutdown: resumable, not ended
        self._ended[job.job_id] = job.status
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.time() - self.config.job_retention_s
        for job_id, status in list(self._ended.items()):
            if len(self._ended) <= self.config.max_kept_jobs and status.ended_at >= horizon:
                break
            del self._ended[job_id]
            self.store.delete(job_id)

    def resume_stored(self) -> int:
        """Load the store: keep ended jobs' statuses, resubmit the unfinished ones from their
        last checkpoint (call on the loop, before serving). Returns how many resumed."""
        resumed = 0
        statuses = []
        for job_id in self.store.job_ids():
            data = self.store.get(job_id, "status")
            if data is None:
                self.store.delete(job_id)  # killed between its request and its status
                continue
            statuses.append(sampler_pb2.JobStatus.FromString(data))
        for status in sorted(statuses, key=lambda s: s.created_at):
            if status.state in _ENDED:
                self._ended[status.job_id] = status
            else:
                resumed += self._resume(status)
        self._forget_old()
        return resumed

    def _resume(self, status: sampler_pb2.JobStatus) -> int:
        job_id = status.job_id
        request = sampler_pb2.GenerateRequest.FromString(self.store.get(job_id, "request") or b"")
        checkpoint, revisions = None, []
        data = self.store.get(job_id, "checkpoint")
        if data is not None:
            try:
                checkpoint, revisions = decode_checkpoint(data)
            except JobStoreError as e:  # the same seed gives the same run: start over
                logger.warning("job %s: %s; it starts over", job_id, e)
        try:
            plan = parse_request(request, self.config)
        except ExpertError as e:  # refused by this Sampler's configuration
            status.state = JobState.JOB_STATE_FAILED
            status.error_code, status.error_field = e.code.value, e.field
            status.error_message, status.ended_at = e.reason, time.time()
            self.store.put(job_id, "status", status.SerializeToString())
            self._ended[job_id] = status
            return 0
        resume = Resume(
            checkpoint, tuple(tuple(r) for r in revisions), status.resumes + 1, status.created_at
        )
        job = self.jobs.make(plan, self.config, job_id=job_id, store=self.store, resume=resume)
        self._live[job_id] = job
        self.jobs.submit(job, resumed=True)
        self.metrics.resumed.inc()
        logger.info("job %s resumed after level %d", job_id, job.status.levels_done)
        return 1

    async def stop_all(self, grace: float) -> None:
        """Drain: admit no more jobs, let the running ones finish for up to ``grace`` seconds,
        then stop those still running (they end between two expert calls, resumable from
        their last checkpoint by the next Sampler on a durable store)."""
        for job in self.jobs.close():  # never started: resumable as they are
            job.drop_unstarted("shutdown", _shutting_down())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        jobs = self.jobs.running()
        for job in jobs:
            await asyncio.to_thread(job.finished.wait, max(0.0, deadline - loop.time()))
        for job in jobs:
            job.stop("shutdown")
        for job in jobs:
            await asyncio.to_thread(job.join, _STOP_WAIT_S)


async def _stream(queue: asyncio.Queue[Any]) -> AsyncIterator[sampler_pb2.GenerateResponse]:
    """A subscriber's messages until the job's end; its error raised."""
    while (item := await queue.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        yield item


def _attach_response(item: sampler_pb2.GenerateResponse) -> sampler_pb2.AttachResponse:
    if item.HasField("level"):
        return sampler_pb2.AttachResponse(level=item.level)
    return sampler_pb2.AttachResponse(result=item.result)


def _job_id(value: str) -> str:
    if not JOB_ID.fullmatch(value):
        raise ExpertError.invalid("job_id", "1 to 64 of [A-Za-z0-9._-]")
    return value


# --------------------------------------------------------------------------- server


def grpc_options(config: SamplerServerConfig) -> list[tuple[str, int]]:
    """Options of the sampler's server (see :func:`poegen.kernel.transport.server_options`)."""
    return server_options(config.max_message_bytes, config.keepalive)


class SamplerHost:
    """The sampler's gRPC server, health, reflection and jobs."""

    def __init__(self, config: SamplerServerConfig) -> None:
        self.config = config
        self.servicer = SamplerServicer(config)
        self.health = health.aio.HealthServicer()
        interceptors = tracing.server_interceptors(config.tracing)
        if config.token is not None:
            interceptors.append(TokenInterceptor(config.token.get_secret_value()))
        self.server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
        add_service(self.server, self.servicer, _SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind()
        self.metrics_port: int | None = None  # bound by start() when metrics_port is set

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    def _bind(self) -> int:
        return bind(self.server, self.config.host, self.config.port, self.config.tls)

    async def start(self) -> None:
        resumed = self.servicer.resume_stored()  # before serving: their ids answer at once
        if resumed:
            logger.info("resumed %d jobs from the job store", resumed)
        await self.server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.servicer.metrics.serve_http(
                self.config.metrics_host, self.config.metrics_port
            )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, _SERVING)
        logger.info("sampler service on %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new jobs, let running ones finish for up to ``grace``
        seconds (their streams deliver their results), then stop the rest."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.servicer.stop_all(grace)
        # every job has ended: what remains are streams sending their last replies
        await self.server.stop(_STOP_WAIT_S)
        self.servicer.metrics.close()
        self.servicer.store.close()


def create_sampler_server(
    config: SamplerServerConfig | None = None,
) -> tuple[SamplerHost, int]:
    """Build and bind the sampler service (not started); return it and its port.

    Call from inside the event loop that will run it. ``port=0`` binds a free port.
    """
    host = SamplerHost(config or SamplerServerConfig())
    return host, host.port


async def serve_sampler(
    config: SamplerServerConfig, *, announce: Callable[[str], None] | None = None
) -> int:
    """Run the service until SIGTERM or SIGINT, then stop its jobs; return 0.

    A process entry point: it also tunes the allocator for large messages
    (:func:`poegen.kernel.transport.tune_allocator`).

    ``announce`` receives ``"poegen: serving sampler on <host>:<port>"`` once it listens
    (the line format of ``poegen serve``).
    """
    tune_allocator()  # a process entry point: see poegen.kernel.transport
    host, _ = create_sampler_server(config)
    await host.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if announce is not None:
            announce(f"poegen: serving sampler on {host.address}")
        await stop.wait()
        logger.info("shutting down: stopping jobs, %.1f s grace", config.grace_s)
        await host.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


__all__ = [
    "FactorPlan",
    "Job",
    "JobPlan",
    "LinkPlan",
    "SamplerHost",
    "SamplerServerConfig",
    "SamplerServicer",
    "SourcePlan",
    "create_sampler_server",
    "generate_result",
    "job_error",
    "level_event",
    "link_waves",
    "parse_request",
    "serve_sampler",
    "settings_from_proto",
]
