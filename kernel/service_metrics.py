"""Prometheus metrics of one sampler host, in its own ``CollectorRegistry``.

Each host owns a registry (never the global one), so a process may run many hosts, as the
tests do. Exposed names:

* ``poegen_sampler_jobs{state}``: jobs ``running`` now and ``queued`` for a slot;
* ``poegen_sampler_jobs_finished_total{outcome}``: jobs that ended ``completed``, ``failed``
  or ``stopped`` (cancelled, the client left, or stopped at shutdown);
* ``poegen_sampler_jobs_resumed_total``: jobs resumed from the job store at start-up;
* ``poegen_sampler_levels_total``: noise levels done, over all jobs (``rate()`` is levels/s);
* ``poegen_sampler_expert_calls_total{expert}`` and ``poegen_sampler_expert_seconds_total{expert}``:
  expert calls the jobs made and their wall time, by the expert's name in the job
  (mean latency: the ratio of their rates).

``serve_http(host, port)`` starts the ``/metrics`` endpoint in a daemon thread and returns the
bound port (``port=0`` picks a free one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from poegen.kernel.calls import ExpertStats

logger = logging.getLogger(__name__)

OUTCOMES = ("completed", "failed", "stopped")


class MetricsEndpoint:
    """``/metrics`` over HTTP for a host's own ``registry`` (the sampler's and the experts')."""

    registry: CollectorRegistry
    _http: tuple[WSGIServer, threading.Thread] | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Start ``/metrics`` on ``host:port`` in a daemon thread; return the bound port."""
        self._http = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http[0].server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class SamplerMetrics(MetricsEndpoint):
    """The metrics of one sampler host (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Gauge("poegen_sampler_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.finished = Counter(
            "poegen_sampler_jobs_finished",
            "Jobs that ended, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.finished.labels(outcome=outcome)  # every series exists from the start
        self.resumed = Counter(
            "poegen_sampler_jobs_resumed",
            "Jobs resumed from the job store at start-up",
            registry=self.registry,
        )
        self.levels = Counter(
            "poegen_sampler_levels", "Noise levels done over all jobs", registry=self.registry
        )
        self.expert_calls = Counter(
            "poegen_sampler_expert_calls",
            "Expert calls made by jobs",
            ["expert"],
            registry=self.registry,
        )
        self.expert_seconds = Counter(
            "poegen_sampler_expert_seconds",
            "Wall time of expert calls made by jobs",
            ["expert"],
            registry=self.registry,
        )

    def track_jobs(self, running: Callable[[], int], queued: Callable[[], int]) -> None:
        self.jobs.labels(state="running").set_function(running)
        self.jobs.labels(state="queued").set_function(queued)

    def level_done(self, experts: Mapping[str, ExpertStats]) -> None:
        self.levels.inc()
        for name, stats in experts.items():
            self.expert_calls.labels(expert=name).inc(stats.calls)
            self.expert_seconds.labels(expert=name).inc(stats.seconds)

    def job_finished(self, outcome: str) -> None:
        self.finished.labels(outcome=outcome).inc()
