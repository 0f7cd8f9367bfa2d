"""An Expert backed by a remote ``ExpertService``: the kernel's gRPC client.

:class:`RemoteExpert` implements the Expert protocol (:mod:`poegen.kernel.experts`) by calling
an expert host over a synchronous gRPC channel. The kernel calls experts from worker threads
(:class:`poegen.kernel.calls.ExpertCalls`, one thread per expert), so the API is blocking and
thread-safe; several calls of one RemoteExpert may be in flight at once::

    from poegen.kernel.remote import RemoteExpert
    from poegen.kernel.sampler import sample
    from poegen.kernel.spec import Factor

    with RemoteExpert.connect("127.0.0.1:50051") as flow, \\
         RemoteExpert.connect("127.0.0.1:50052", condition="a red cube") as reward:
        result = sample([Factor(flow), Factor(reward, weight=5.0)], (16, 64, 64),
                        generator=torch.Generator().manual_seed(0))
        print(flow.revisions_seen)

What ``connect`` does: opens the channel (TLS when ``tls`` is given; the bearer ``token`` goes
in the ``authorization`` metadata of every call), calls ``Describe`` once (its answer is
:meth:`RemoteExpert.describe`, so the kernel chunks batches by the server's ``max_batch``), and
``Prepare``\\ s the condition once when one is given; every later call carries the handle.
``describe().max_batch`` is the server's limit, lowered when needed so that a batch of float32
samples fits the message size limit (the smaller of ours and the server's).
:meth:`RemoteExpert.close` (or leaving the ``with`` block) releases the handle and closes the
channel.

Calls and their RPCs: ``velocity(x, σ)`` → ``Velocity``; ``log_prob(x, σ)`` and
``log_potential(x0)`` → ``LogProb`` (with and without σ); ``score(x, σ)`` → ``Score``;
``velocity_vjp(x, σ, c)`` → ``VelocityVjp``; ``propose(x, σ, seed=)`` and
``project(x, σ)`` → ``Propose``; ``encode(pixels)`` / ``decode(latents)`` → ``Encode`` /
``Decode``; ``schedule(num_steps, sample_shape)`` → ``Schedule``; ``render(names)`` →
``Render`` for the prepared condition. Every reply's model revision is recorded in
:attr:`RemoteExpert.revisions_seen` (distinct revisions, first seen first; two entries mean
the model was hot-swapped during the run).

Failures, each raised as :class:`RemoteExpertError` (an
:class:`~poegen.kernel.errors.ExpertError`: ``.code``, ``.field``, ``.reason``, plus
``.method`` and ``.address``):

* a status the server sent with a ``BadRequest`` keeps its code and field (``"x.shape"``,
  ``"sigma"``, ``"handle"``), read back with :func:`~poegen.kernel.errors.from_rpc_error`;
* UNAVAILABLE (server not up yet, restarting, still loading its first model) is retried
  ``retries`` times — or, once the expert has answered, for ``outage_s`` seconds from the
  first failure, when given — with
  exponential backoff (``backoff_s·2^k``, capped at ``max_backoff_s``)
  and jitter drawn from the expert's own ``random.Random(jitter_seed)``; nothing else is
  retried, since other codes will not change by asking again;
* each attempt has its own deadline of ``deadline_s`` seconds; DEADLINE_EXCEEDED says so;
* a handle the server no longer knows (NOT_FOUND on ``"handle"``: the server restarted or
  evicted it; FAILED_PRECONDITION: the model was hot-swapped) is prepared again, once per call;
* :meth:`RemoteExpert.cancel` cancels the calls in flight and refuses new ones (CANCELLED).

Dtypes. What the kernel gives is what is sent: float32, float16, bfloat16 and float64 cross
the wire unchanged, and replies come back in the request's dtype (log-densities as float32, or
float64 for a float64 request). A float64 batch that would not fit one message (the limit in
``describe().max_batch`` counts float32) is sent in chunks. For the same seed, a remote expert
gives *identical* samples to the same expert in-process, in float32 and in float64 alike: the
tensors the expert sees are the same bits either way, and the expert is a deterministic
function of them. (A server older than ``DTYPE_F64`` refuses float64 batches as an unknown
dtype: run the kernel in float32 against it.)

Tensors returned are the codec's zero-copy views of the reply's bytes (converted only when
the dtype differs): *read-only-backed*, so never modify them in place (``add_``, ``out=``,
item assignment); the kernel never does. Clone one first if you must. Requests are
:class:`~poegen.kernel.codec.WireMessage`\\ s: each tensor's bytes are copied once, straight
into the serialised request.

Shared memory (``shared_memory=True``): when the server also opted in (its ``Describe`` says
so) and the address is on this host (``localhost``, ``127.*``, ``[::1]`` or ``unix:``),
request tensors of at least 64 KiB go through POSIX shared-memory segments instead of the
socket, and ``Velocity`` / ``Propose`` offer the server a room in the same segments for the
reply (``reply_shared_memory``), which this client copies out (one ``pread``) before the
segment is reused: then neither direction's tensor crosses the socket. Segments belong to this
expert, are reused across calls and unlinked by :meth:`close`; those of a call that failed
(its server may still write the reply room late) are unlinked at once, never reused.

No asyncio variant: the kernel runs experts in threads, and a sync channel there costs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import torch
from torch import Tensor

from poegen.kernel import codec
from poegen.kernel import tracing as traces
from poegen.kernel.errors import code_of, from_rpc_error
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind, LatentLayout
from poegen.kernel.refusal import Code, ExpertError
from poegen.kernel.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    bearer_metadata,
    channel_options,
    unary_methods,
)
from poegen.v1 import expert_pb2

logger = logging.getLogger(__name__)

_KINDS = {
    expert_pb2.EXPERT_KIND_GENERATIVE: ExpertKind.GENERATIVE,
    expert_pb2.EXPERT_KIND_DISCRIMINATIVE: ExpertKind.DISCRIMINATIVE,
    expert_pb2.EXPERT_KIND_CONSTRAINT: ExpertKind.CONSTRAINT,
}
_CAPABILITIES = {
    expert_pb2.CAPABILITY_SCORE: Capability.SCORE,
    expert_pb2.CAPABILITY_LOG_PROB: Capability.LOG_PROB,
    expert_pb2.CAPABILITY_PROPOSE: Capability.PROPOSE,
    expert_pb2.CAPABILITY_PROJECT: Capability.PROJECT,
    expert_pb2.CAPABILITY_AUTOENCODER: Capability.AUTOENCODER,
    expert_pb2.CAPABILITY_SCHEDULE: Capability.SCHEDULE,
    expert_pb2.CAPABILITY_RENDER: Capability.RENDER,
    expert_pb2.CAPABILITY_VJP: Capability.VJP,
}
_LOOPBACK_PREFIXES = ("localhost:", "127.", "[::1]:", "unix:", "ipv4:127.", "ipv6:[::1]")
_MESSAGE_OVERHEAD = 64 << 10  # room for the fields around the tensors of a message
_HANDLE_LOST = (Code.NOT_FOUND, Code.FAILED_PRECONDITION)


class RemoteExpertError(ExpertError):
    """A failed call to a remote expert: the server's code and field, and where it happened.

    ``field`` and ``reason`` are the server's own (empty field for transport errors such as
    UNAVAILABLE or DEADLINE_EXCEEDED); ``str()`` adds the RPC and the address.
    """

    def __init__(self, code: Code, field: str, reason: str, *, method: str, address: str) -> None:
        super().__init__(code, field, reason)
        self.method = method
        self.address = address
        detail = f"{field}: {reason}" if field else reason
        self.args = (f"{method} on expert at {address}: {code.name}: {detail}",)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: at most ``retries`` more attempts, waiting
    ``uniform(½, 1)·min(max_backoff_s, backoff_s·2^k)`` before attempt ``k + 1`` — or, with
    ``outage_s``, as many as fit in ``outage_s`` seconds from the first failure (an expert
    restarting within that window is picked up where the job was)."""

    retries: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    outage_s: float | None = None

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.outage_s is not None and not (self.outage_s > 0 and math.isfinite(self.outage_s)):
            raise ValueError(f"outage_s: must be a positive number, got {self.outage_s}")
        if not (self.backoff_s > 0 and self.max_backoff_s >= self.backoff_s):
            raise ValueError("backoff_s: needs 0 < backoff_s <= max_backoff_s")

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        return base * (0.5 + 0.5 * rng.random())

    def again(self, attempt: int, down_s: float, delay: float, *, reached: bool = True) -> bool:
        """Whether to retry after ``attempt`` failed attempts, ``down_s`` seconds after the
        first, waiting ``delay`` more. The outage window holds only for an expert that has
        answered before (``reached``): an address that never did fails after ``retries``."""
        if self.outage_s is not None and reached:
            return down_s + delay < self.outage_s
        return attempt < self.retries


class RemoteExpert:
    """An Expert answered by a remote ``ExpertService`` (see the module docstring).

    Build it with :meth:`connect`. Thread-safe; a context manager.
    """

    def __init__(
        self,
        open_channel: Callable[[], grpc.Channel],
        address: str,
        *,
        condition: expert_pb2.Condition | None,
        token: str | None,
        deadline_s: float,
        retry: RetryPolicy,
        jitter_seed: int,
        shared_memory: bool,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Use :meth:`connect`; this opens a channel with ``open_channel()`` and makes no call."""
        if not (deadline_s > 0 and math.isfinite(deadline_s)):
            raise ValueError(f"deadline_s: must be a positive number, got {deadline_s}")
        self.address = address
        self.deadline_s = deadline_s
        self._open_channel = open_channel
        self._channel = open_channel()
        self._rpcs = _expert_rpcs(self._channel)
        self._condition = condition
        self._metadata = bearer_metadata(token)
        self._retry = retry
        self._reached = False  # answered once: from then on an outage is waited out
        self._trace_context: Any | None = None  # see connect(trace_context=)
        self._rng = random.Random(jitter_seed)
        self._lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._closed = False
        self._revisions: list[str] = []
        self._handle = ""
        self._info: ExpertInfo | None = None
        self._describe: expert_pb2.DescribeResponse | None = None
        self._want_shared_memory = shared_memory
        self._max_message_bytes = max_message_bytes
        self._message_bytes = max_message_bytes  # the smaller of ours and the server's
        self._pools: list[codec.SharedMemoryPool] = []
        self._all_pools: list[codec.SharedMemoryPool] = []
        self._use_shared_memory = False

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        condition: expert_pb2.Condition | str | None = None,
        token: str | None = None,
        tls: grpc.ChannelCredentials | None = None,
        deadline_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        outage_s: float | None = None,
        jitter_seed: int = 0,
        shared_memory: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tracing: bool = False,
        trace_context: Any | None = None,
        authority: str | None = None,
    ) -> RemoteExpert:
        """Open a channel to ``address`` (``host:port``), ``Describe`` and ``Prepare``.

        Args:
            condition: a ``poegen.v1.Condition``, or a prompt (its ``text``); prepared once.
            token: bearer token of the expert host, if it wants one.
            tls: channel credentials (``grpc.ssl_channel_credentials(...)``); plaintext if None.
            deadline_s: deadline of each attempt of each call.
            retries, backoff_s, max_backoff_s, outage_s: retries of UNAVAILABLE
                (:class:`RetryPolicy`; with ``outage_s``, for that long instead of a count).
            jitter_seed: seed of the backoff jitter's own generator.
            shared_memory: send large request tensors, and take large replies, through shared
                memory when the server also opted in and is on this host.
            max_message_bytes: largest message sent and received (as the server's option).
            tracing: every call a client span (:mod:`poegen.kernel.tracing`), in
                ``trace_context`` (the request a job serves) when given.
            authority: the name the channel presents (``:authority``, and what a TLS
                certificate is checked against) instead of ``address``: a replica resolved
                from a DNS name (:mod:`poegen.kernel.replicas`) is still that name.

        Raises :class:`RemoteExpertError` when the server cannot be reached or refuses.
        """
        if isinstance(condition, str):
            condition = expert_pb2.Condition(text=condition)
        options: list[tuple[str, Any]] = [*channel_options(max_message_bytes)]
        if authority is not None:
            options.append(("grpc.default_authority", authority))

        def open_channel() -> grpc.Channel:
            if tls is not None:
                channel = grpc.secure_channel(address, tls, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
            return traces.traced_channel(channel, tracing)

        expert = cls(
            open_channel,
            address,
            condition=condition,
            token=token,
            deadline_s=deadline_s,
            retry=RetryPolicy(retries, backoff_s, max_backoff_s, outage_s),
            jitter_seed=jitter_seed,
            shared_memory=shared_memory,
            max_message_bytes=max_message_bytes,
        )
        expert._trace_context = trace_context
        try:
            expert._start()
        except BaseException:
            expert.close()
            raise
        return expert

    # ------------------------------------------------------------------ Expert protocol

    def describe(self) -> ExpertInfo:
        """The server's ``Describe`` answer at connect time, as :class:`ExpertInfo`."""
        if self._info is None:
            raise RuntimeError("RemoteExpert: not connected (use RemoteExpert.connect)")
        return self._info

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        """v(x_σ, σ) ``(B, *S)`` from ``Velocity``."""
        request = expert_pb2.VelocityRequest()
        return self._call("Velocity", request, {"x": x, "sigma": sigma}, "velocity", x, x.dtype)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log p_σ(x_σ) ``(B,)`` from ``LogProb`` with σ (generative experts)."""
        request = expert_pb2.LogProbRequest()
        tensors = {"x": x, "sigma": sigma}
        return self._call("LogProb", request, tensors, "log_prob", x, _per_sample(x))

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """∇ log q_σ(x_σ) ``(B, *S)`` from ``Score``."""
        request = expert_pb2.ScoreRequest()
        return self._call("Score", request, {"x": x, "sigma": sigma}, "score", x, x.dtype)

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        """J_v(x_σ)ᵀ·c ``(B, *S)`` from ``VelocityVjp``."""
        request = expert_pb2.VelocityVjpRequest()
        tensors = {"x": x, "sigma": sigma, "cotangent": cotangent.to(x.dtype)}
        return self._call("VelocityVjp", request, tensors, "vjp", x, x.dtype)

    def log_potential(self, x0: Tensor) -> Tensor:
        """log-potential ``(B,)`` of clean estimates from ``LogProb`` without σ."""
        request = expert_pb2.LogProbRequest()
        return self._call("LogProb", request, {"x": x0}, "log_prob", x0, _per_sample(x0))

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        """A random move of x_σ ``(B, *S)`` from ``Propose`` (mode PROPOSE)."""
        mode = expert_pb2.PROPOSE_MODE_PROPOSE
        return self._propose(x, sigma, mode, seed)

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        """A deterministic map of x_σ ``(B, *S)`` from ``Propose`` (mode PROJECT)."""
        return self._propose(x, sigma, expert_pb2.PROPOSE_MODE_PROJECT, 0)

    def encode(self, pixels: Tensor) -> Tensor:
        """Latents of pixels in [-1, 1] from ``Encode``, in chunks of ``max_batch``."""
        return self._autoencode("Encode", expert_pb2.EncodeRequest, "pixels", "latents", pixels)

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [-1, 1] of latents from ``Decode``, in chunks of ``max_batch``."""
        return self._autoencode("Decode", expert_pb2.DecodeRequest, "latents", "pixels", latents)

    def schedule(self, num_steps: int, sample_shape: Sequence[int]) -> list[float]:
        """The expert's own noise grid (``num_steps + 1`` levels) from ``Schedule``."""
        request = expert_pb2.ScheduleRequest(num_steps=num_steps, sample_shape=list(sample_shape))
        reply: expert_pb2.ScheduleResponse = self._invoke("Schedule", request)
        return list(reply.sigmas)

    def render(self, names: Sequence[str] = ()) -> dict[str, Tensor]:
        """Named tensors derived from the prepared condition, from ``Render`` (all if no
        ``names``)."""
        request = expert_pb2.RenderRequest(handle=self._handle, names=list(names))
        reply: expert_pb2.RenderResponse = self._invoke("Render", request)
        out = {}
        for name, msg in reply.tensors.items():
            field = f"tensors[{name}]"
            try:
                out[name] = codec.decode(msg, field=field)
            except ExpertError as e:
                raise self._error("Render", e.code, e.field, f"bad reply: {e.reason}") from None
        missing = sorted(set(names) - set(out))
        if missing:
            raise self._error("Render", Code.INTERNAL, "names", f"bad reply: no output {missing}")
        return out

    # ------------------------------------------------------------------ lifecycle

    @property
    def revisions_seen(self) -> tuple[str, ...]:
        """Distinct model revisions named by the replies so far, first seen first."""
        with self._lock:
            return tuple(self._revisions)

    @property
    def uses_shared_memory(self) -> bool:
        """Whether tensors go through shared memory (both ends opted in, same host)."""
        return self._use_shared_memory

    @property
    def handle(self) -> str:
        """The condition handle in use ("" for the default condition)."""
        return self._handle

    def cancel(self) -> None:
        """Cancel the calls in flight and refuse new ones (CANCELLED); idempotent.

        Closes the channel: that ends every call on it at once. (Calls are blocking calls in
        the caller's thread, which gRPC drives without a helper thread; a channel-wide close
        is how they are cancelled from another thread.) :meth:`close` still releases the
        handle, through a channel of its own.
        """
        self._cancelled.set()
        self._channel.close()

    def close(self) -> None:
        """Release the handle, close the channel, unlink shared memory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handle, self._handle = self._handle, ""
        if handle:
            self._release(handle)
        self._channel.close()
        for pool in self._all_pools:
            pool.close()

    def _release(self, handle: str) -> None:
        # one short attempt: a server that is gone has forgotten the handle anyway (its TTL)
        # cancel() closed our channel: release through a fresh one
        fresh = self._open_channel() if self._cancelled.is_set() else None
        release = (_expert_rpcs(fresh) if fresh is not None else self._rpcs)["Release"]
        try:
            release(
                expert_pb2.ReleaseRequest(handle=handle),
                timeout=min(self.deadline_s, 5.0),
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            logger.warning("could not release a handle at %s: %s", self.address, e.code())
        finally:
            if fresh is not None:
                fresh.close()

    def __enter__(self) -> RemoteExpert:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self._info.name if self._info else "?"
        return f"RemoteExpert({name!r} at {self.address})"

    # ------------------------------------------------------------------ internals

    def _start(self) -> None:
        reply: expert_pb2.DescribeResponse = self._invoke("Describe", expert_pb2.DescribeRequest())
        self._describe = reply
        info = describe_to_info(reply)
        self._message_bytes = min(self._max_message_bytes, reply.max_message_bytes or 2**62)
        limit = _batch_limit(info, self._message_bytes)
        if limit is not None and (info.max_batch is None or limit < info.max_batch):
            info = dataclasses.replace(info, max_batch=limit)
        self._info = info
        self._use_shared_memory = (
            self._want_shared_memory
            and reply.shared_memory
            and self.address.startswith(_LOOPBACK_PREFIXES)
        )
        if self._want_shared_memory and not self._use_shared_memory:
            logger.info("shared memory off for %s (server or address not eligible)", self.address)
        if self._condition is not None:
            self._handle = self._prepare()

    def _prepare(self) -> str:
        request = expert_pb2.PrepareRequest(condition=self._condition)
        reply: expert_pb2.PrepareResponse = self._invoke("Prepare", request, reprepare=False)
        return reply.handle

    def _propose(self, x: Tensor, sigma: Tensor, mode: int, seed: int) -> Tensor:
        request = expert_pb2.ProposeRequest(mode=mode, seed=seed)  # type: ignore[arg-type]
        return self._call("Propose", request, {"x": x, "sigma": sigma}, "x", x, x.dtype)

    def _autoencode(
        self, method: str, request_type: Any, field: str, reply_field: str, t: Tensor
    ) -> Tensor:
        step = (self._info.max_batch if self._info else None) or max(1, t.shape[0])
        parts = []
        for i in range(0, max(1, t.shape[0]), step):
            chunk = t[i : i + step]
            reply = self._invoke(method, codec.WireMessage(request_type(), {field: chunk}))
            try:
                out = codec.decode_field(reply, reply_field)
            except ExpertError as e:
                raise self._error(method, e.code, e.field, f"bad reply: {e.reason}") from None
            if out.ndim < 1 or out.shape[0] != chunk.shape[0]:
                raise self._error(method, Code.INTERNAL, f"{reply_field}.shape", "bad reply: batch")
            parts.append(out)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _call(
        self,
        method: str,
        request: Any,
        tensors: dict[str, Tensor],
        field: str,
        x: Tensor,
        dtype: torch.dtype,
    ) -> Tensor:
        """One model call for the batch ``x`` (in ``tensors``); the reply's ``field`` tensor.

        The reply has x's shape (Velocity, Propose: then it may come back through a room in
        our shared memory) or one value per sample (LogProb). A batch wider than float32 that
        would not fit one message is sent in chunks (``describe().max_batch`` counts float32).
        """
        limit = self._wide_limit(x)
        if limit is not None and x.shape[0] > limit:
            parts = []
            for i in range(0, x.shape[0], limit):
                chunk = type(request)()
                chunk.CopyFrom(request)
                part = {k: t[i : i + limit] for k, t in tensors.items()}
                parts.append(self._call(method, chunk, part, field, x[i : i + limit], dtype))
            return torch.cat(parts)
        same_shape = field != "log_prob"
        shape = tuple(x.shape) if same_shape else tuple(x.shape[:1])
        request.handle = self._handle
        with self._encoder() as enc:
            wire = enc.request(request, tensors, reply_nbytes=_nbytes(x) if same_shape else None)
            reply = self._invoke(method, wire, on_failure=enc.spoil)
            # inside the block: a reply in our shared memory is read before the pool is reused
            return self._decoded(reply, method, field, shape, dtype, enc)

    def _wide_limit(self, x: Tensor) -> int | None:
        """The largest batch of a dtype wider than float32 that fits one message, or None."""
        if x.element_size() <= 4 or self._info is None:
            return None
        return _batch_limit(self._info, self._message_bytes, x.element_size())

    def _encoder(self) -> _Encoder:
        """Encodes request tensors; with shared memory, holds a pool until the reply."""
        if not self._use_shared_memory:
            return _Encoder(None, None)
        with self._lock:
            if self._pools:
                pool = self._pools.pop()
            else:
                pool = codec.SharedMemoryPool()
                self._all_pools.append(pool)
        return _Encoder(pool, self._give_back)

    def _give_back(self, pool: codec.SharedMemoryPool, reusable: bool) -> None:
        if reusable:
            pool.reset()
            with self._lock:
                self._pools.append(pool)
            return
        # a failed call's server may still write its reply room: never reuse that memory
        with self._lock:
            self._all_pools.remove(pool)
        pool.close()

    def _decoded(
        self,
        reply: Any,
        method: str,
        field: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        enc: _Encoder,
    ) -> Tensor:
        msg = getattr(reply, field)
        in_room = msg.WhichOneof("storage") == "shared_memory"
        if in_room and (enc.room is None or msg.shared_memory != enc.room):
            raise self._error(
                method,
                Code.INTERNAL,
                f"{field}.shared_memory",
                "bad reply: shared memory this client did not offer",
            )
        try:
            out = codec.decode_field(reply, field, shared_memory=enc.pool if in_room else None)
        except ExpertError as e:
            raise self._error(method, e.code, e.field, f"bad reply: {e.reason}") from None
        if tuple(out.shape) != tuple(shape):
            raise self._error(
                method,
                Code.INTERNAL,
                f"{field}.shape",
                f"bad reply: shape {list(out.shape)}, expected {list(shape)}",
            )
        # no copy when the dtype matches: a read-only-backed view (see the module docstring)
        return out.to(dtype)

    def _invoke(
        self,
        method: str,
        request: Any,
        *,
        reprepare: bool = True,
        on_failure: Callable[[], None] | None = None,
    ) -> Any:
        """One RPC with retries of UNAVAILABLE, a deadline per attempt, errors converted.

        ``request`` is a message or a :class:`codec.WireMessage`; ``on_failure`` runs after
        every failed attempt (before a retry, or before raising).
        """
        rpc = self._rpcs[method]
        message = getattr(request, "message", request)
        attempt = 0
        down_since: float | None = None
        while True:
            if self._cancelled.is_set() or self._closed:
                raise self._error(method, Code.CANCELLED, "", "the expert was cancelled")
            try:
                with traces.attached(self._trace_context):
                    reply = rpc(request, timeout=self.deadline_s, metadata=self._metadata)
            except (grpc.RpcError, ValueError) as e:  # ValueError: the channel is closed
                if on_failure is not None:
                    on_failure()
                if self._cancelled.is_set():
                    raise self._error(
                        method, Code.CANCELLED, "", "the expert was cancelled"
                    ) from None
                if isinstance(e, ValueError):
                    raise
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.UNAVAILABLE:
                    now = time.monotonic()
                    down_since = now if down_since is None else down_since
                    with self._lock:
                        delay = self._retry.delay(attempt, self._rng)
                    retry = self._retry.again(
                        attempt, now - down_since, delay, reached=self._reached
                    )
                else:
                    retry = False
                if retry:
                    attempt += 1
                    logger.info(
                        "%s at %s unavailable; retry %d in %.2f s", method, self.address,
                        attempt, delay,
                    )  # fmt: skip
                    self._cancelled.wait(delay)
                    continue
                err = self._from_rpc_error(method, e, attempt)
                if reprepare and self._lost_handle(message, err):
                    logger.info("handle lost at %s (%s); preparing again", self.address, err.code)
                    message.handle = self._renew_handle(message.handle)
                    reprepare = False
                    continue
                raise err from None
            self._reached = True
            self._record(getattr(reply, "revision", ""))
            return reply

    def _renew_handle(self, stale: str) -> str:
        """A fresh handle for the condition, prepared once however many calls lost ``stale``."""
        with self._prepare_lock:
            if self._handle == stale:
                self._handle = self._prepare()
            return self._handle

    def _lost_handle(self, request: Any, err: ExpertError) -> bool:
        return (
            self._condition is not None
            and bool(getattr(request, "handle", ""))
            and err.code in _HANDLE_LOST
            and err.field == "handle"
        )

    def _from_rpc_error(self, method: str, e: grpc.RpcError, attempts: int) -> RemoteExpertError:
        sent = from_rpc_error(e)
        if sent is not None:
            return self._error(method, sent.code, sent.field, sent.reason)
        code: grpc.StatusCode = e.code()  # type: ignore[attr-defined]
        details = e.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no reply within deadline_s={self.deadline_s:g} s"
        elif code == grpc.StatusCode.UNAVAILABLE:
            reason = f"unavailable after {attempts + 1} attempt(s): {details}"
        else:
            reason = details or code.name
        return self._error(method, code_of(code), "", reason)

    def _error(self, method: str, code: Code, field: str, reason: str) -> RemoteExpertError:
        return RemoteExpertError(code, field, reason, method=method, address=self.address)

    def _record(self, revision: str) -> None:
        if not revision:
            return
        with self._lock:
            if revision not in self._revisions:
                if self._revisions:
                    logger.info("expert at %s now serves revision %s", self.address, revision)
                self._revisions.append(revision)


class _Encoder:
    """Builds one call's request; with shared memory, holds a pool until the reply is read.

    :meth:`request` puts large request tensors in the pool and offers a room in it for the
    reply (``reply_shared_memory``). After a failed attempt (:meth:`spoil`) the server may
    still write that room late, so later attempts take their reply inline and the pool is
    closed, not reused, when the block ends.
    """

    def __init__(
        self,
        pool: codec.SharedMemoryPool | None,
        give_back: Callable[[codec.SharedMemoryPool, bool], None] | None,
    ) -> None:
        self.pool = pool
        self.room: Any = None  # the SharedMemoryRef offered for the reply
        self._give_back = give_back
        self._request: Any = None
        self._spoiled = False

    def request(
        self, message: Any, tensors: dict[str, Tensor], *, reply_nbytes: int | None
    ) -> codec.WireMessage:
        wire = codec.WireMessage(message, tensors, shared_memory=self.pool)
        if self.pool is not None and reply_nbytes is not None:
            self.room = self.pool.reserve(reply_nbytes)
            if self.room is not None:
                message.reply_shared_memory.CopyFrom(self.room)
        self._request = message
        return wire

    def spoil(self) -> None:
        if self.room is not None:
            self._request.ClearField("reply_shared_memory")
            self.room = None
            self._spoiled = True

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.pool is not None and self._give_back is not None:
            self._give_back(self.pool, exc_type is None and not self._spoiled)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _expert_rpcs(channel: grpc.Channel) -> dict[str, Any]:
    service = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]
    return unary_methods(channel, service, parser=codec.parser)


def _batch_limit(info: ExpertInfo, max_message_bytes: int, itemsize: int = 4) -> int | None:
    """The largest batch whose tensors (float32 by default) fit one message (None: any
    shape, no bound)."""
    if info.sample_shape is None:
        return None
    per_sample = itemsize * max(1, math.prod(info.sample_shape)) + 64  # + σ and framing
    return max(1, (max_message_bytes - _MESSAGE_OVERHEAD) // per_sample)


def _per_sample(x: Tensor) -> torch.dtype:
    # log-densities come as float32 (the wire's choice); float64 runs get float64 back
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def describe_to_info(reply: expert_pb2.DescribeResponse) -> ExpertInfo:
    """``DescribeResponse`` → :class:`ExpertInfo` (0 / empty → ``None``: no limit, any shape)."""
    kind = _KINDS.get(reply.kind)
    if kind is None:
        raise ExpertError(Code.INTERNAL, "kind", f"bad Describe reply: kind {reply.kind}")
    return ExpertInfo(
        name=reply.name,
        kind=kind,
        capabilities=frozenset(_CAPABILITIES[c] for c in reply.capabilities if c in _CAPABILITIES),
        sample_shape=tuple(reply.sample_shape) or None,
        max_batch=reply.max_batch or None,
        model_id=reply.model_id,
        revision=reply.revision,
        latent_space=reply.latent_space,
        pixel_input=reply.pixel_input,
        latent_layout=_layout(reply) if reply.HasField("latent_layout") else None,
    )


def _layout(reply: expert_pb2.DescribeResponse) -> LatentLayout:
    msg = reply.latent_layout
    return LatentLayout(
        channels=msg.channels,
        packing=msg.packing,
        spatial_compression=msg.spatial_compression,
        temporal_compression=msg.temporal_compression,
        multiple=msg.multiple,
        shift=msg.shift,
        dynamic_shift=dict(msg.dynamic_shift),
    )


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RemoteExpert",
    "RemoteExpertError",
    "RetryPolicy",
    "channel_options",
    "describe_to_info",
]
