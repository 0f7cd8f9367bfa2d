"""bench/load.py's driver against a real local stack (processes): jobs complete, their latency
percentiles are ordered, nothing fails."""

from __future__ import annotations

import yaml
from helpers.timing import scaled

from poegen import LocalStack
from poegen.bench import load


def test_the_load_driver_runs_jobs_through_a_stack(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(load._stack(max_jobs=2, max_queued=8)))
    with LocalStack.from_yaml(path) as stack:
        row = load.drive(stack, clients=2, seconds=scaled(1.0))
    assert row["jobs"] >= 2 and row["errors"] == {}
    assert row["p50_s"] <= row["p95_s"] <= row["p99_s"]
    assert row["jobs_per_s"] > 0


def test_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert load._percentile(values, 0.5) == 51.0
    assert load._percentile(values, 0.99) == 100.0
    assert load._percentile([], 0.5) is None
