"""One expert served by several replicas: a gRPC target naming them, chunks spread across them.

A factor's address may name several replicas of one expert host, as a gRPC target::

    ipv4:127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053   # a list (IPv6: ipv6:[::1]:1,[::1]:2)
    dns:///poegen-flux-headless:50051                      # a Kubernetes headless Service

:func:`connect_expert` returns a :class:`~poegen.kernel.remote.RemoteExpert` for a plain
``host:port`` (or any other target, and a one-member list) and a :class:`ReplicatedExpert`
otherwise. A ReplicatedExpert holds one RemoteExpert per replica, each with its own channel and
its own ``Prepare``\\ d handle, and answers the Expert protocol like one expert:

* **Chunks in parallel.** It announces ``concurrent_chunks`` (the replicas found at connect),
  and :class:`~poegen.kernel.calls.ExpertCalls` sends that many chunks of a batch at once; each
  call goes to the live replica with the fewest calls in flight, ties broken round robin. With
  r replicas and chunks of b samples an evaluation of N particles takes ⌈N/(r·b)⌉ call times.
* **Same result as one replica, bit for bit.** The chunks are the ones a single replica would
  get (``ExpertCalls`` cuts them by the run's and the expert's ``max_batch`` alone), each
  replica is a deterministic function of its chunk, and calls that are not chunked
  (``propose`` with its seed, ``project``, ``schedule``, ``render``) go whole to one replica.
  Evaluations are counted per chunk, as for one replica.
* **A replica that dies costs no job.** A call failing with UNAVAILABLE (or CANCELLED that
  this side did not ask for: a host stopping without grace) marks its replica down and goes to
  another one at once; a down replica is tried again after a backoff
  (``backoff_s·2^k``, capped at ``max_backoff_s``, with jitter), so one that comes back is used
  again (its lost handle is prepared again, as for one RemoteExpert). Only when every replica is
  down does a call wait, for ``outage_s`` from then (or ``retries`` backoffs) as a RemoteExpert
  does for its one server, and then fail with UNAVAILABLE naming the whole address. Other
  errors are the replica's own and are raised as they are (the address is the whole target,
  the reason names the replica).
* **Replicas must agree.** Every replica's ``Describe`` must match the first one's in all but
  the revision (which numbers each host process anew): name, kind, capabilities, sample shape,
  limits, model id, latent space and layout. At connect a mismatch is INVALID_ARGUMENT naming
  both replicas; a replica that joins later and disagrees is logged and never used.
* **DNS.** A ``dns:`` target (``dns:///host:port`` or ``dns:host:port``; no DNS-server
  authority) is resolved with :func:`socket.getaddrinfo` at connect (every address is a
  replica), again every ``resolve_every_s`` seconds, and whenever no replica is left: new
  addresses join (connected on first use), vanished ones are no longer used. A job uses at most
  as many replicas at once as it found at connect. With TLS, each replica's channel presents
  ``host:port`` as its authority, so the certificate is checked against the Service's name,
  not the pod's address.

Replica channels are opened with the same options as one RemoteExpert; their own retries are
off (a failing replica is skipped instead of waited for). Parsing is :func:`parse_target`: a
malformed list (no port, not an IP literal, a duplicate, more than :data:`MAX_REPLICAS`) raises
``ValueError`` naming what is wrong, which the Sampler service answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from torch import Tensor

from poegen.kernel.experts import ExpertInfo
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError, RetryPolicy
from poegen.kernel.transport import DEFAULT_MAX_MESSAGE_BYTES
from poegen.v1 import expert_pb2

logger = logging.getLogger(__name__)

MAX_REPLICAS = 64  # replicas one target may name (or resolve to); each holds a channel
RESOLVE_EVERY_S = 30.0  # a dns: target is resolved again this often (and when all are down)
_T = TypeVar("_T")
_SCHEMES = ("ipv4:", "ipv6:", "dns:")
# a replica gone or going: UNAVAILABLE, or CANCELLED when we did not cancel (a host stopping
# without grace cancels its calls in flight); its calls are pure, so another replica can answer
_REPLICA_DOWN = (Code.UNAVAILABLE, Code.CANCELLED)
_V4_MEMBER = re.compile(r"(?P<host>[0-9.]+):(?P<port>\d{1,5})")
_V6_MEMBER = re.compile(r"\[(?P<host>[0-9A-Fa-f:.]+)\]:(?P<port>\d{1,5})")
_DNS_NAME = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})")


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """A parsed multi-replica target.

    Attributes:
        target: the address as given (stripped).
        scheme: ``"ipv4"``, ``"ipv6"`` or ``"dns"``.
        members: the listed replicas as ``host:port`` / ``[v6]:port`` (empty for ``dns``).
        host, port: what a ``dns`` target resolves (``host`` empty for a list).
    """

    target: str
    scheme: str
    members: tuple[str, ...] = ()
    host: str = ""
    port: int = 0


def is_replica_target(address: str) -> bool:
    """Whether ``address`` uses a scheme this module parses (``ipv4:``, ``ipv6:``, ``dns:``)."""
    return address.strip().startswith(_SCHEMES)


def parse_target(address: str) -> ReplicaTarget:
    """Parse an ``ipv4:``, ``ipv6:`` or ``dns:`` target; ``ValueError`` saying what is wrong."""
    address = address.strip()
    scheme, _, rest = address.partition(":")
    if scheme == "dns":
        return _parse_dns(address, rest)
    if scheme not in ("ipv4", "ipv6"):
        raise ValueError(f"expected an ipv4:, ipv6: or dns: target, got {address!r}")
    if not rest:
        raise ValueError(f"{scheme}: lists no replica")
    members = tuple(m.strip() for m in rest.split(","))
    if len(members) > MAX_REPLICAS:
        raise ValueError(f"{len(members)} replicas; at most {MAX_REPLICAS}")
    for member in members:
        _check_member(scheme, member)
    seen: set[str] = set()
    for member in members:
        if member in seen:
            raise ValueError(f"lists replica {member} twice")
        seen.add(member)
    return ReplicaTarget(address, scheme, members)


def _check_member(scheme: str, member: str) -> None:
    pattern = _V4_MEMBER if scheme == "ipv4" else _V6_MEMBER
    form = "a.b.c.d:port" if scheme == "ipv4" else "[v6]:port"
    match = pattern.fullmatch(member)
    if match is None:
        raise ValueError(f"replica {member!r} is not {form}")
    try:
        ip = ipaddress.ip_address(match.group("host"))
    except ValueError:
        raise ValueError(f"replica {member!r}: not an IP address") from None
    if ip.version != (4 if scheme == "ipv4" else 6):
        raise ValueError(f"replica {member!r} is not {form}")
    _check_port(member, match.group("port"))


def _check_port(where: str, port: str) -> int:
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{where}: port must be 1-65535")
    return number


def _parse_dns(address: str, rest: str) -> ReplicaTarget:
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if authority or not slash:
            raise ValueError("dns: a DNS server (authority) is not supported; use dns:///host:port")
    match = _DNS_NAME.fullmatch(rest)
    if match is None:
        raise ValueError(f"expected dns:///host:port, got {address!r}")
    port = _check_port(address, match.group("port"))
    return ReplicaTarget(address, "dns", host=match.group("v6") or match.group("host"), port=port)


def resolve(host: str, port: int) -> tuple[str, ...]:
    """Every address ``host`` resolves to, as ``ip:port`` / ``[v6]:port``, in the resolver's
    order without repeats (``socket.getaddrinfo``; raises ``OSError`` when it cannot)."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        member = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if member not in found:
            found.append(member)
    return tuple(found[:MAX_REPLICAS])


def connect_expert(address: str, **options: Any) -> RemoteExpert | ReplicatedExpert:
    """A :class:`ReplicatedExpert` for a target naming several replicas (a list of two or
    more, or any ``dns:`` target), else a :class:`RemoteExpert`; ``options`` as
    :meth:`RemoteExpert.connect`. ``ValueError`` for a malformed target."""
    address = address.strip()
    if is_replica_target(address):
        target = parse_target(address)
        if target.scheme == "dns" or len(target.members) > 1:
            return ReplicatedExpert.connect(target, **options)
    return RemoteExpert.connect(address, **options)


class _Replica:
    """One replica's state; every field but ``expert`` is read and written under the lock."""

    def __init__(self, index: int, address: str) -> None:
        self.index = index
        self.address = address
        self.expert: RemoteExpert | None = None  # connected on first use
        self.in_flight = 0
        self.failures = 0  # UNAVAILABLE in a row
        self.down_until = 0.0  # monotonic time before which it is not tried
        self.excluded = ""  # why it is not used at all: "disagrees", "gone" (dns dropped it)
        self.connecting = threading.Lock()


class _Mismatch(Exception):
    """A replica's Describe differs from the first replica's."""


class ReplicatedExpert:
    """An Expert answered by several replicas (see the module docstring).

    Build it with :meth:`connect` (or :func:`connect_expert`). Thread-safe; a context manager.
    """

    def __init__(
        self,
        target: ReplicaTarget,
        connect_one: Callable[[str], RemoteExpert],
        *,
        retry: RetryPolicy,
        jitter_seed: int = 0,
        resolve_every_s: float = RESOLVE_EVERY_S,
        resolver: Callable[[str, int], Sequence[str]] = resolve,
    ) -> None:
        """Use :meth:`connect`; this makes no call. ``connect_one(address)`` connects one
        replica (``Describe``, ``Prepare``) or raises :class:`RemoteExpertError`."""
        self.address = target.target
        self.target = target
        self._connect_one = connect_one
        self._retry = retry
        self._rng = random.Random(jitter_seed)
        self._resolver = resolver
        self._resolve_every_s = resolve_every_s
        self._resolve_at = 0.0
        self._resolving = threading.Lock()
        self._lock = threading.Lock()
        self._replicas: list[_Replica] = [_Replica(i, m) for i, m in enumerate(target.members)]
        self._cursor = 0
        self._cancelled = threading.Event()
        self._closed = False
        self._info: ExpertInfo | None = None
        self._reference = ""  # the replica whose Describe the others must match
        self.concurrent_chunks = 1

    @classmethod
    def connect(
        cls,
        target: ReplicaTarget | str,
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
        resolve_every_s: float = RESOLVE_EVERY_S,
    ) -> ReplicatedExpert:
        """Resolve the target, connect every replica concurrently (``Describe``, ``Prepare``)
        and check that they agree; options as :meth:`RemoteExpert.connect`, whose retry
        settings hold for the replicas as a whole.

        Succeeds when at least one replica answers (the others are tried on first use); with
        none, retries UNAVAILABLE ``retries`` times, then raises it.
        """
        parsed = parse_target(target) if isinstance(target, str) else target
        # TLS to a name: each replica's channel says the name, and the certificate must match it
        authority = f"{parsed.host}:{parsed.port}" if parsed.scheme == "dns" and tls else None

        def connect_one(address: str) -> RemoteExpert:
            return RemoteExpert.connect(
                address, condition=condition, token=token, tls=tls, deadline_s=deadline_s,
                retries=0, backoff_s=backoff_s, max_backoff_s=max_backoff_s, outage_s=None,
                jitter_seed=jitter_seed, shared_memory=shared_memory,
                max_message_bytes=max_message_bytes, tracing=tracing,
                trace_context=trace_context, authority=authority,
            )  # fmt: skip

        expert = cls(
            parsed,
            connect_one,
            retry=RetryPolicy(retries, backoff_s, max_backoff_s, outage_s),
            jitter_seed=jitter_seed,
            resolve_every_s=resolve_every_s,
        )
        try:
            expert._start()
        except BaseException:
            expert.close()
            raise
        return expert

    # ------------------------------------------------------------------ Expert protocol

    def describe(self) -> ExpertInfo:
        """The replicas' common ``Describe`` (the revision of the one that answered first)."""
        if self._info is None:
            raise RuntimeError("ReplicatedExpert: not connected (use ReplicatedExpert.connect)")
        return self._info

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._dispatch("Velocity", lambda e: e.velocity(x, sigma))

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._dispatch("LogProb", lambda e: e.log_prob(x, sigma))

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._dispatch("Score", lambda e: e.score(x, sigma))

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        return self._dispatch("VelocityVjp", lambda e: e.velocity_vjp(x, sigma, cotangent))

    def log_potential(self, x0: Tensor) -> Tensor:
        return self._dispatch("LogProb", lambda e: e.log_potential(x0))

    def propose(self, x: Tensor, sigma: Tensor, seed: int) -> Tensor:
        """The whole batch to one replica: the seed draws the noise of all its rows."""
        return self._dispatch("Propose", lambda e: e.propose(x, sigma, seed))

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._dispatch("Propose", lambda e: e.project(x, sigma))

    def encode(self, pixels: Tensor) -> Tensor:
        return self._dispatch("Encode", lambda e: e.encode(pixels))

    def decode(self, latents: Tensor) -> Tensor:
        return self._dispatch("Decode", lambda e: e.decode(latents))

    def schedule(self, num_steps: int, sample_shape: Sequence[int]) -> list[float]:
        return self._dispatch("Schedule", lambda e: e.schedule(num_steps, sample_shape))

    def render(self, names: Sequence[str] = ()) -> dict[str, Tensor]:
        return self._dispatch("Render", lambda e: e.render(names))

    # ------------------------------------------------------------------ lifecycle

    @property
    def replicas(self) -> tuple[str, ...]:
        """The replicas' addresses in use (listed, or resolved and not dropped since)."""
        with self._lock:
            return tuple(r.address for r in self._replicas if not r.excluded)

    @property
    def revisions_seen(self) -> tuple[str, ...]:
        """Distinct revisions named by the replicas' replies, replica by replica (each host
        process numbers its revisions anew, so r replicas give at least r)."""
        seen: list[str] = []
        for expert in self._experts():
            seen.extend(r for r in expert.revisions_seen if r not in seen)
        return tuple(seen)

    @property
    def uses_shared_memory(self) -> bool:
        """Whether every connected replica takes tensors through shared memory."""
        experts = self._experts()
        return bool(experts) and all(e.uses_shared_memory for e in experts)

    def cancel(self) -> None:
        """Cancel the calls in flight on every replica and refuse new ones; idempotent."""
        self._cancelled.set()
        for expert in self._experts():
            expert.cancel()

    def close(self) -> None:
        """Release every replica's handle and close its channel; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for expert in self._experts():
            expert.close()

    def __enter__(self) -> ReplicatedExpert:
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
        return f"ReplicatedExpert({name!r} at {self.address}, {len(self.replicas)} replicas)"

    # ------------------------------------------------------------------ internals

    def _experts(self) -> list[RemoteExpert]:
        with self._lock:
            return [r.expert for r in self._replicas if r.expert is not None]

    def _start(self) -> None:
        """Connect every replica at once; retry (as ``RetryPolicy`` without an outage) while
        none answers."""
        attempt = 0
        while True:
            self._refresh(force=True)
            with self._lock:
                pending = [r for r in self._replicas if r.expert is None and not r.excluded]
            errors = [e for e in self._connect_all(pending) if e is not None]
            refused = [e for e in errors if e.code != Code.UNAVAILABLE]
            if refused:  # a token, a condition: asking another replica would not change it
                raise refused[0]
            if self._info is not None:
                break
            last = errors[0] if errors else None
            delay = self._retry.delay(attempt, self._rng)
            if not self._retry.again(attempt, 0.0, delay, reached=False):
                reason = last.reason if last is not None else "resolves to no address"
                raise self._error("Describe", Code.UNAVAILABLE, "", reason)
            attempt += 1
            if self._cancelled.wait(delay):
                raise self._error("Describe", Code.CANCELLED, "", "cancelled")
        with self._lock:
            self.concurrent_chunks = max(1, sum(not r.excluded for r in self._replicas))
        self._resolve_at = time.monotonic() + self._resolve_every_s

    def _connect_all(self, pending: list[_Replica]) -> list[RemoteExpertError | None]:
        """Connect ``pending`` concurrently; a replica that disagrees fails the connect, one that
        is UNAVAILABLE is marked down, other errors are returned in order."""
        if not pending:
            return []
        with ThreadPoolExecutor(len(pending), thread_name_prefix="poegen-replica") as pool:
            futures = [pool.submit(self._connect_replica, r) for r in pending]
            outcomes = [f.exception() for f in futures]
        errors: list[RemoteExpertError | None] = []
        for replica, error in zip(pending, outcomes, strict=True):
            if isinstance(error, _Mismatch):
                raise self._error("Describe", Code.INVALID_ARGUMENT, "", str(error))
            if error is not None and not isinstance(error, RemoteExpertError):
                raise error
            if isinstance(error, RemoteExpertError):
                if error.code == Code.UNAVAILABLE:
                    self._mark_down(replica)
                error = self._rewrapped(error, replica)
            errors.append(error)
        return errors

    def _connect_replica(self, replica: _Replica) -> RemoteExpert:
        """The replica's RemoteExpert, connected now if it was not; ``_Mismatch`` when its
        ``Describe`` differs from the reference replica's."""
        with replica.connecting:
            if replica.expert is not None:
                return replica.expert
            expert = self._connect_one(replica.address)
            try:
                self._agree(replica, expert.describe())
            except _Mismatch:
                expert.close()
                with self._lock:
                    replica.excluded = "disagrees"
                raise
            with self._lock:
                replica.expert = expert
                closed = self._closed or self._cancelled.is_set()
            if closed:  # the job ended while this replica connected
                if self._cancelled.is_set():
                    expert.cancel()
                else:
                    expert.close()
            return expert

    def _agree(self, replica: _Replica, info: ExpertInfo) -> None:
        with self._lock:
            if self._info is None:
                self._info, self._reference = info, replica.address
                return
            reference, where = self._info, self._reference
        for f in dataclasses.fields(ExpertInfo):
            if f.name == "revision":
                continue
            mine, theirs = getattr(info, f.name), getattr(reference, f.name)
            if mine != theirs:
                raise _Mismatch(
                    f"the replicas disagree on {f.name}: {theirs!r} at {where}, {mine!r} at "
                    f"{replica.address}"
                )

    def _dispatch(self, method: str, call: Callable[[RemoteExpert], _T]) -> _T:
        """``call`` on a live replica; UNAVAILABLE moves it to another, and waits (as the
        retry policy allows) only while every replica is down."""
        attempt = 0
        down_since: float | None = None
        last: RemoteExpertError | None = None
        while True:
            if self._cancelled.is_set() or self._closed:
                raise self._error(method, Code.CANCELLED, "", "the expert was cancelled")
            self._refresh()
            replica = self._pick()
            if replica is None:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                with self._lock:
                    delay = self._retry.delay(attempt, self._rng)
                if not self._retry.again(attempt, now - down_since, delay):
                    detail = f": {last.reason}" if last is not None else ""
                    raise self._error(
                        method, Code.UNAVAILABLE, "", f"every replica is down{detail}"
                    )
                attempt += 1
                self._cancelled.wait(delay)
                self._refresh(force=True)
                self._probe_all()
                continue
            try:
                result = call(self._connect_replica(replica))
            except _Mismatch as e:
                logger.error("%s: replica %s not used: %s", self.address, replica.address, e)
                continue
            except RemoteExpertError as e:
                if e.code not in _REPLICA_DOWN or self._cancelled.is_set():
                    raise self._rewrapped(e, replica) from None
                last = self._rewrapped(e, replica)
                self._mark_down(replica)
                continue
            finally:
                with self._lock:
                    replica.in_flight -= 1
            self._mark_up(replica)
            return result

    def _pick(self) -> _Replica | None:
        """The usable replica with the fewest calls in flight (ties: round robin), or None."""
        now = time.monotonic()
        with self._lock:
            n = len(self._replicas)
            ready = [r for r in self._replicas if not r.excluded and r.down_until <= now]
            if not ready:
                return None
            start = self._cursor
            best = min(ready, key=lambda r: (r.in_flight, (r.index - start) % n))
            self._cursor = (best.index + 1) % n
            best.in_flight += 1
            return best

    def _mark_down(self, replica: _Replica) -> None:
        with self._lock:
            replica.failures += 1
            replica.down_until = time.monotonic() + self._retry.delay(
                replica.failures - 1, self._rng
            )
            first = replica.failures == 1
        if first:
            logger.warning(
                "%s: replica %s is down; its calls go to the others", self.address, replica.address
            )

    def _mark_up(self, replica: _Replica) -> None:
        with self._lock:
            was_down, replica.failures, replica.down_until = replica.failures, 0, 0.0
        if was_down:
            logger.info("%s: replica %s is back", self.address, replica.address)

    def _probe_all(self) -> None:
        """After a wait with every replica down: try each again now."""
        with self._lock:
            for replica in self._replicas:
                replica.down_until = 0.0

    def _refresh(self, *, force: bool = False) -> None:
        """Resolve a ``dns:`` target again when due (or ``force``d): new addresses become
        replicas (connected on first use), vanished ones stop being used."""
        if self.target.scheme != "dns" or not (force or time.monotonic() >= self._resolve_at):
            return
        if not self._resolving.acquire(blocking=False):
            return  # another thread resolves right now
        try:
            self._resolve_at = time.monotonic() + self._resolve_every_s
            try:
                found = tuple(self._resolver(self.target.host, self.target.port))
            except OSError as e:
                logger.warning("%s: cannot resolve %s: %s", self.address, self.target.host, e)
                return
        finally:
            self._resolving.release()
        with self._lock:
            known = {r.address: r for r in self._replicas}
            for replica in self._replicas:
                if replica.address not in found and not replica.excluded:
                    replica.excluded = "gone"
                elif replica.address in found and replica.excluded == "gone":
                    replica.excluded = ""
            for address in found:
                if address not in known and len(self._replicas) < MAX_REPLICAS:
                    self._replicas.append(_Replica(len(self._replicas), address))

    def _rewrapped(self, e: RemoteExpertError, replica: _Replica) -> RemoteExpertError:
        reason = f"{e.reason} (replica {replica.address})"
        return self._error(e.method, e.code, e.field, reason)

    def _error(self, method: str, code: Code, field: str, reason: str) -> RemoteExpertError:
        return RemoteExpertError(code, field, reason, method=method, address=self.address)


ConnectedExpert = RemoteExpert | ReplicatedExpert
"""What :func:`connect_expert` returns."""

__all__ = [
    "MAX_REPLICAS",
    "ConnectedExpert",
    "ReplicaTarget",
    "ReplicatedExpert",
    "connect_expert",
    "is_replica_target",
    "parse_target",
    "resolve",
]
