"""bench/scale.py on tiny sizes (``--quick``): real replica processes and the Sampler service.
What must hold whatever the machine's speed: every job completes (also with a replica killed
mid-run), results equal one replica's bit for bit, and the model calls counted are the cost
model's. No speed is asserted (the ratios are the benchmark's to print)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from helpers.timing import scaled

from poegen.bench import provenance, scale


def test_the_cost_model():
    sizes = scale.Sizes(particles=32, batch=4, levels=8, moves=1)
    assert scale.evaluations(sizes) == 1 + 7 * 2
    # 8 chunks: 8 rounds on one replica, 2 on four, 1 on eight (and on more)
    assert [scale.predicted_job_s(sizes, r, 1.0) / 15 for r in (1, 4, 8, 16)] == [8, 2, 1, 1]


def test_a_quick_run_completes_every_job_identically(tmp_path):
    """The command of the docs: ``.venv/bin/python bench/scale.py --quick`` (here with --out)."""
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--quick", "--out", str(out)],
        cwd=scale.REPO, capture_output=True, text=True, timeout=scaled(300),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replicas  jobs/s" in done.stdout and "0 of 2 jobs failed" in done.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["measures"] == list(provenance.MEASURES["scale"])
    figures = data["replicas"]
    sizes = scale.Sizes.quick()
    rows = figures["throughput"]
    assert [row["replicas"] for row in rows] == list(sizes.replicas)
    calls = scale.evaluations(sizes) * math.ceil(sizes.particles / sizes.batch)
    for row in rows:
        assert row["failed"] == 0 and row["identical_to_one_replica"]
        assert row["calls_per_job"] == row["calls_predicted"] == calls
        assert row["jobs_per_s"] > 0 and row["predicted_job_s"] > 0
    killed = figures["killed_mid_run"]
    assert killed["failed_jobs"] == 0 and killed["errors"] == []
    assert killed["identical_to_undisturbed"]
    # the dynamic-batching half (bench/batching.py, tested in test_batching_bench.py)
    merged = data["dynamic_batching"]
    assert merged["throughput_ratio"] > 0 and merged["latency_ratio"] > 0
