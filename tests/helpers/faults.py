"""Faults injected on purpose into a real expert host: latency, an error status, a killed process.

The one fake the suite allows: a ``grpc.aio.ServerInterceptor`` that sits in front of the real
servicer (``create_server(..., interceptors=[faults])``, or ``loop.serve(expert,
interceptors=[faults])``) and, for the calls its rules pick, delays them, ends them with a
status, or SIGKILLs the whole process. Everything else is the real host and the real client.

::

    faults = FaultInjector()
    served = loop.serve(Gaussian(), interceptors=[faults])
    ...                                          # calls pass untouched: no rule yet
    faults.set(Rule(methods=("Velocity",), code=grpc.StatusCode.UNAVAILABLE, times=3))
    ...                                          # the next 3 Velocity calls end UNAVAILABLE
    faults.clear()                               # the outage is over
    assert faults.injected == 3

A :class:`Rule` says *which* calls (``methods``: short RPC names such as ``"Velocity"``,
``"Prepare"``, ``"Score"``; empty: every RPC, health included), *what* happens to them
(``delay_s`` of added latency before the call reaches the servicer, then, with ``code``, the
call ends with that status instead of running; or ``kill``), and *when*: the first ``after``
matching calls pass, then each is hit with ``probability`` (drawn from the rule's own
``random.Random(seed)``, so a run is reproducible) until ``times`` calls were hit (``None``: no
end). Rules are tried in order; the first that hits a call applies, and the rules after it do
not see that call. :meth:`FaultInjector.set` replaces the rules (their counts start again) and
:meth:`FaultInjector.clear` removes them, from any thread, while the host serves: the server's
loop and the test's thread share the state under one lock.

``kill`` sends SIGKILL to the process the host runs in (a crash inside a call: no drain, no
reply, connections reset). In the test process that would end pytest, so an injector refuses
kill rules unless built with ``allow_kill=True``, which only the child-process entry point
does::

    python tests/helpers/faults.py CONFIG.yaml --port P --kill Velocity --after K

serves the expert file ``CONFIG.yaml`` (as ``poegen serve analytic --config`` does) and dies
on the (K+1)-th ``Velocity`` call (:func:`helpers.server.start_process` starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from poegen.kernel.errors import ExpertError, code_of
from poegen.kernel.transport import refusing

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
INJECTED = "injected fault"  # the reason an aborted call carries


@dataclass(frozen=True, slots=True)
class Rule:
    """Which calls to hit, how, and when (see the module docstring)."""

    methods: tuple[str, ...] = ()
    delay_s: float = 0.0
    code: grpc.StatusCode | None = None
    kill: bool = False
    after: int = 0
    times: int | None = None
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            raise TypeError("methods: a tuple of RPC names, e.g. ('Velocity',)")
        if not (self.delay_s >= 0):
            raise ValueError(f"delay_s: must be >= 0, got {self.delay_s}")
        if self.code is grpc.StatusCode.OK:
            raise ValueError("code: a fault needs a non-OK status")
        if self.kill and (self.delay_s or self.code is not None):
            raise ValueError("kill: a killed process neither delays nor answers")
        if not (self.kill or self.delay_s or self.code is not None):
            raise ValueError("a rule needs delay_s, code or kill")
        if self.after < 0 or (self.times is not None and self.times < 1):
            raise ValueError("after: must be >= 0; times: None or >= 1")
        if not (0 < self.probability <= 1):
            raise ValueError(f"probability: must be in (0, 1], got {self.probability}")


@dataclass(slots=True)
class _Armed:
    """A rule and its counts since :meth:`FaultInjector.set`."""

    rule: Rule
    seen: int = 0
    hit: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.rule.seed)

    def hits(self, method: str) -> bool:
        rule = self.rule
        if rule.methods and method not in rule.methods:
            return False
        self.seen += 1
        if self.seen <= rule.after or (rule.times is not None and self.hit >= rule.times):
            return False
        if rule.probability < 1 and self.rng.random() >= rule.probability:
            return False
        self.hit += 1
        return True


class FaultInjector(grpc.aio.ServerInterceptor):
    """Applies :class:`Rule` s to the calls of the host it is installed on; counts the hits."""

    def __init__(self, *rules: Rule, allow_kill: bool = False) -> None:
        self._allow_kill = allow_kill
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self._injected: collections.Counter[str] = collections.Counter()
        self.set(*rules)

    def set(self, *rules: Rule) -> None:
        """Replace the rules (counting ``after`` and ``times`` from now)."""
        if not self._allow_kill and any(r.kill for r in rules):
            raise ValueError("kill: only for a host in a child process (allow_kill=True)")
        with self._lock:
            self._armed = [_Armed(r) for r in rules]

    def clear(self) -> None:
        """No more faults: every call passes untouched."""
        self.set()

    @property
    def injected(self) -> int:
        """Calls hit so far, all rules and methods together (never reset)."""
        with self._lock:
            return sum(self._injected.values())

    def injected_on(self, method: str) -> int:
        """Calls of ``method`` (short name) hit so far."""
        with self._lock:
            return self._injected[method]

    def _pick(self, method: str) -> Rule | None:
        with self._lock:
            for armed in self._armed:
                if armed.hits(method):
                    self._injected[method] += 1
                    return armed.rule
        return None

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        # one task per call runs this: a delay here holds up only the call it is for
        rule = self._pick(handler_call_details.method.rsplit("/", 1)[-1])
        if rule is None:
            return await continuation(handler_call_details)
        if rule.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if rule.delay_s:
            await asyncio.sleep(rule.delay_s)
        handler = await continuation(handler_call_details)
        if handler is None or rule.code is None:
            return handler
        return refusing(handler, ExpertError(code_of(rule.code), "", INJECTED))


async def _serve_dying(config: str, port: int, method: str, after: int) -> None:
    from poegen.expert_servers.server import ServerConfig, create_server
    from poegen.expert_servers.server.expert_file import load_expert_file

    faults = FaultInjector(Rule(methods=(method,), kill=True, after=after), allow_kill=True)
    served = load_expert_file(config)
    host, bound = create_server(ServerConfig(port=port), expert=served, interceptors=[faults])
    await host.start()
    print(f"poegen: serving dying on 127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()  # until the rule (or the test) kills us


def main(argv: Sequence[str] | None = None) -> None:
    """The child-process entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="an expert host that SIGKILLs itself")
    parser.add_argument("config", help="expert YAML file, as for poegen serve analytic")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kill", default="Velocity", help="RPC whose call kills the process")
    parser.add_argument("--after", type=int, default=0, help="calls of it that pass first")
    args = parser.parse_args(argv)
    asyncio.run(_serve_dying(args.config, args.port, args.kill, args.after))


if __name__ == "__main__":
    main()
