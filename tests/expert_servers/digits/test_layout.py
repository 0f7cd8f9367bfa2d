"""The layout application: its example files, its background expert, its demo and benchmark.

The example stack and spec (``examples/layout/``) are what the demo runs, field by field; the
demo's fast form runs its real ``run`` through a Sampler and expert servers on real gRPC in
this process (:class:`helpers.threaded_stack.ThreadedStack`)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from poegen.clients.files import load_model_file
from poegen.clients.spec import GenerationSpec, to_request
from poegen.clients.stack import StackConfig
from poegen.expert_servers.digits import layout
from poegen.kernel.experts import create_expert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "layout"
ENDPOINTS = {"digit": "127.0.0.1:1", "background": "127.0.0.1:2", "reward": "127.0.0.1:3"}


def test_the_example_spec_is_the_spec_the_demo_runs(tmp_path: Path) -> None:
    from poegen.clients.layout_demo import spec_mapping, write_region

    example = GenerationSpec.from_file(EXAMPLES / "spec.yaml")
    region = write_region(tmp_path / "region.png")
    demo = GenerationSpec.from_mapping(spec_mapping(region))
    shape = list(layout.CANVAS)
    assert example.sample_shape == shape
    assert to_request(example, shape, ENDPOINTS) == to_request(demo, shape, ENDPOINTS)
    # the committed region is the complement of the boxes
    crops = [e.crop for e in example.experts if e.endpoint == "digit"]
    assert crops == [[tuple(w) for w in box.window] for box in layout.LAYOUT]


def test_the_example_stack_is_the_stack_the_demo_starts() -> None:
    from poegen.clients.layout_demo import stack_mapping

    example = load_model_file(StackConfig, EXAMPLES / "stack.yaml")
    demo = StackConfig.model_validate(stack_mapping())
    fields = ("name", "backend", "model", "expert", "params", "latent_space")
    assert [e.model_dump(include=set(fields)) for e in example.experts] == [
        e.model_dump(include=set(fields)) for e in demo.experts
    ]
    # relative model folders resolve against the stack file, to the shipped models
    assert all(Path(e.model).is_dir() for e in example.experts if e.model)


def test_the_background_expert_is_the_exact_empty_canvas() -> None:
    """x0 ~ N(−1, s²): E[x0 | x_σ] = −1 + (1−σ)s²/((1−σ)²s² + σ²)·(x − (1−σ)·(−1)) and
    v = E[ε − x0 | x_σ] with ε = (x − (1−σ)·x0)/σ."""
    std = 0.1
    canvas = create_expert("blank_canvas", height=3, width=5, std=std)
    info = canvas.describe()
    assert info.sample_shape == (1, 3, 5) and info.latent_space == "pixels-1"
    x = torch.randn((4, 1, 3, 5), generator=torch.Generator().manual_seed(0))
    for sigma in (0.9, 0.4, 0.05):
        a, var = 1 - sigma, std**2
        x0 = -1 + a * var / (a * a * var + sigma**2) * (x + a)
        expected = (x - a * x0) / sigma - x0
        got = canvas.velocity(x, torch.full((4,), sigma))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        create_expert("blank_canvas", height=3, width=5, std=1.5)


def test_paste_and_the_metrics() -> None:
    digits = [torch.full((2, 1, 16, 16), float(k) / 4 - 0.5) for k in range(len(layout.LAYOUT))]
    canvas = layout.paste(digits)
    assert canvas.shape == (2, *layout.CANVAS)
    # a later box overwrites an earlier one on their overlap
    last = layout.LAYOUT[-1]
    assert torch.equal(last.of(canvas), digits[-1])
    assert torch.equal(layout.background_ink(canvas), torch.zeros(2))
    inked = canvas.clone()
    inked[..., layout.CANVAS[1] - 1, 0] = 1.0  # one pixel below the first box: background
    outside = int(layout.background_region(layout.LAYOUT).sum())
    assert torch.allclose(layout.background_ink(inked), torch.full((2,), 1 / outside))


TABLE_ROW = re.compile(
    r"^(poegen|product without MCMC/SMC|paste) +([\d.]+)% +([\d.]+) +(\d+)$", re.M
)


def test_layout_demo_runs_its_jobs_through_a_sampler_and_expert_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fast form of ``poegen demo --app layout``: 8 particles, 4 levels."""
    from helpers.demos import run_fast_demo
    from PIL import Image

    from poegen.clients.layout_demo import run

    out = tmp_path / "layout.png"
    run_fast_demo(run, out, particles=8, steps=4)
    printed = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in TABLE_ROW.finditer(printed)}
    assert set(rows) == {"poegen", "product without MCMC/SMC", "paste"}, printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["metric"] == "judge share per box" and record["higher_is_better"] is True
    assert set(record["baselines"]) == {"product without MCMC/SMC", "paste"}
    shares = [record["poegen"], *record["baselines"].values()]
    assert all(0 <= s <= 1 and math.isfinite(s) for s in shares)
    # equal evaluations: each baseline within one particle's cost of poegen's budget
    budget = record["evaluations"]
    for method, evaluations in record["evaluations_per_method"].items():
        assert budget - 4 * 5 * 4 <= evaluations <= budget, method
        assert int(rows[method][3]) == evaluations
    sheet = Image.open(out)
    assert sheet.size[0] > 6 * layout.CANVAS[2] * 4 and sheet.size[1] > 3 * layout.CANVAS[1] * 4


def test_the_benchmark_runs_every_method_at_equal_evaluations() -> None:
    from poegen.bench import apps
    from poegen.expert_servers.classifier import ClassifierAdapter
    from poegen.expert_servers.flow import FlowAdapter

    experts = {
        "prior": apps.load(FlowAdapter(), "flow-cond"),
        "reward": apps.load(ClassifierAdapter(), "classifier-reward"),
        "judge": apps.load(ClassifierAdapter(), "classifier-judge"),
    }
    settings = layout.settings(0.125).model_copy(update={"num_steps": 4})
    rows = apps.layout_methods(experts, settings, seed=0)
    budget = rows["poegen"]["evaluations"]
    assert set(rows) == {"poegen", "product without MCMC/SMC", "paste"}
    for method, row in rows.items():
        assert budget - 5 * 4 <= row["evaluations"] <= budget, method
        assert 0 <= row["judge_share"] <= 1 and 0 <= row["stray_ink"] <= 1


def test_the_documented_generate_command_runs_the_example(tmp_path: Path) -> None:
    """``poegen generate examples/layout/spec.yaml --stack examples/layout/stack.yaml -o …``
    (docs/layout.md), as written: the stack's processes, the Sampler, the outputs."""
    from helpers.demos import run_documented_generate
    from safetensors.torch import load_file

    out = tmp_path / "layout"
    run_documented_generate(EXAMPLES, out)
    assert len(list(out.glob("sample_*.png"))) == 8 and (out / "contact_sheet.png").is_file()
    particles = load_file(out / "particles.safetensors")["particles"]
    assert particles.shape == (64, *layout.CANVAS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--app", "nope"], "unknown app 'nope'"),
        (["demo", "--app", "layout", "--analytic"], "either --analytic or --app"),
        (["demo", "--out", "x.png"], "--out names one figure"),
    ],
)
def test_the_demo_refuses_what_it_cannot_run(argv: list[str], message: str, capsys) -> None:
    from poegen.clients.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_the_benchmark_command_writes_its_table_and_json(tmp_path: Path, capsys) -> None:
    """``bench/apps.py --quick`` (README), in this process, to a temporary JSON."""
    from poegen.bench import apps, provenance

    out = tmp_path / "apps.json"
    threads = torch.get_num_threads()
    try:
        apps.main(["--quick", "--threads", "1", "--app", "layout", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "layout       poegen" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["provenance"]["measures"] == list(provenance.MEASURES["apps"])
    assert data["layout"]["metric"] == "judge share per box"
    assert set(data["layout"]["baselines"]) == {"product without MCMC/SMC", "paste"}
