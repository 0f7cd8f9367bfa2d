"""Prometheus metrics of one expert host, in its own ``CollectorRegistry``.

Each host owns a registry (never the global one), so a process may run many hosts, as the
tests do. Exposed names:

* ``poegen_rpc_latency_seconds{method}``: histogram of RPC wall time;
* ``poegen_rpc_errors_total{method,code}``: RPCs that ended with a non-OK status;
* ``poegen_batch_size{method}``: histogram of batch sizes of model calls;
* ``poegen_model_serving``: 1 once a model serves, 0 before (and after shutdown began);
* ``poegen_model_info{model_id,revision}``: 1 for the served model (one series);
* ``poegen_condition_handles``: condition handles held;
* with dynamic batching on (``batching``): ``poegen_merged_batch_calls{method}`` and
  ``poegen_merged_batch_rows{method}``, histograms of the calls and the rows each forward pass
  served (its ``_count`` is the number of forward passes, the calls' ``_sum`` the calls they
  answered), and ``poegen_batch_waiting_calls``, the calls waiting for their batch now.

``serve_http(host, port)`` starts the ``/metrics`` endpoint in a daemon thread and returns the
bound port (``port=0`` picks a free one).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from poegen.kernel.service_metrics import MetricsEndpoint

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics(MetricsEndpoint):
    """The metrics of one host (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "poegen_rpc_latency_seconds",
            "Wall time of an RPC",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "poegen_rpc_errors_total",
            "RPCs that ended with a non-OK status",
            ["method", "code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "poegen_batch_size",
            "Batch size of a model call",
            ["method"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.serving = Gauge(
            "poegen_model_serving", "1 while a model serves", registry=self.registry
        )
        self.model_info = Gauge(
            "poegen_model_info",
            "1 for the served model id and revision",
            ["model_id", "revision"],
            registry=self.registry,
        )
        self.handles = Gauge(
            "poegen_condition_handles", "Condition handles held", registry=self.registry
        )
        self.merged_calls = Histogram(
            "poegen_merged_batch_calls",
            "Calls answered by one forward pass (dynamic batching)",
            ["method"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.merged_rows = Histogram(
            "poegen_merged_batch_rows",
            "Rows of one forward pass of merged calls (dynamic batching)",
            ["method"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_waiting = Gauge(
            "poegen_batch_waiting_calls",
            "Calls waiting to be merged into a batch",
            registry=self.registry,
        )

    def model_swapped(self, model_id: str, revision: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_id=model_id, revision=revision).set(1)
        self.serving.set(1)
