"""bench/batching.py at tiny sizes: two real ``poegen serve flux`` processes (one with
``--batch-delay-ms``), concurrent sampler jobs through RemoteExperts; the figures are computed
from what it measured, the "on" expert counted its forward passes, and the JSON is stamped."""

from __future__ import annotations

import json
import math

from poegen.bench import batching, provenance


def test_the_benchmark_runs_both_experts_and_reports_every_figure(flow_models, tmp_path, capsys):
    out = tmp_path / "batching.json"
    argv = ["--quick", "--model", str(flow_models.path("flux")), "--jobs", "2", "--particles",
            "2", "--levels", "2", "--delay-ms", "2", "--out", str(out)]  # fmt: skip
    assert batching.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["provenance"]["measures"] == list(provenance.MEASURES["batching"])
    expected = {"jobs": 2, "particles": 2, "levels": 2, "batch_delay_ms": 2.0}
    assert result["config"] | expected == result["config"]
    counts = {name: len(walls) for name, walls in result["wall_s"].items()}
    assert counts == {"concurrent_on": 1, "concurrent_off": 1, "single": 1, "alone_on": 3,
                      "alone_off": 3}  # fmt: skip
    assert all(w > 0 for walls in result["wall_s"].values() for w in walls)
    for name in ("throughput_ratio", "throughput_ratio_off", "latency_ratio"):
        assert math.isfinite(result[name]) and result[name] > 0, name
    merged = result["merged"]
    # 2 jobs x 2 levels of one 2-row Velocity call each, all answered by counted passes
    assert merged["passes"] >= 1
    assert math.isclose(merged["calls_per_pass"] * merged["passes"], 4)
    assert 2 <= merged["rows_per_pass"] <= 4
    printed = capsys.readouterr().out
    assert "throughput ratio (on / single)" in printed and "latency ratio" in printed


def test_only_the_on_expert_gets_the_batch_delay_flag():
    on = batching.serve_command(batching.RESULTS, 2.0)
    off = batching.serve_command(batching.RESULTS, 0.0)
    assert on[-2:] == ["--batch-delay-ms", "2"] and "--batch-delay-ms" not in off
    assert on[1:5] == ["-m", "poegen.clients.cli", "serve", "flux"]
