"""The editing application: its example files, the graphics expert's edit masks, the metrics and
the paste baseline, its demo, its benchmark and the documented command.

The example stack and spec (``examples/editing/``) are what the demo runs, field by field; the
demo's fast form runs its real ``run`` through a Sampler and expert servers on real gRPC in
this process (:class:`helpers.threaded_stack.ThreadedStack`), the graphics expert a condition
source whose Render gives the masked targets their masks."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from poegen.clients.files import load_model_file
from poegen.clients.spec import GenerationSpec, to_request
from poegen.clients.stack import StackConfig
from poegen.expert_servers.digits import editing
from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.errors import ExpertError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "editing"
ENDPOINTS = {
    "prior": "127.0.0.1:1", "masked": "127.0.0.1:2", "reward": "127.0.0.1:3",
    "graphics": "127.0.0.1:4",
}  # fmt: skip


@pytest.fixture(scope="module")
def masks() -> editing.Render:
    return editing.render(EXAMPLES / "assets")


def test_the_example_spec_is_the_spec_the_demo_runs() -> None:
    from poegen.clients.editing_demo import spec_mapping

    example = GenerationSpec.from_file(EXAMPLES / "spec.yaml")
    demo = GenerationSpec.from_mapping(spec_mapping(EXAMPLES / "input.safetensors"))
    shape = list(editing.SAMPLE_SHAPE)
    assert example.sample_shape == shape
    # the example writes the placement as commented YAML, the demo as JSON: the same document
    text = example.sources[0].condition.text
    assert yaml.safe_load(text) == editing.PLACEMENT
    ours, theirs = to_request(example, shape, ENDPOINTS), to_request(demo, shape, ENDPOINTS)
    theirs.sources[0].condition.text = text
    assert ours == theirs


def test_the_example_stack_is_the_stack_the_demo_starts() -> None:
    from poegen.clients.editing_demo import stack_mapping

    example = load_model_file(StackConfig, EXAMPLES / "stack.yaml")
    demo = StackConfig.model_validate(stack_mapping(EXAMPLES / "assets"))
    fields = {"name", "backend", "model", "expert", "params", "latent_space"}
    assert [e.model_dump(include=fields) for e in example.experts] == [
        e.model_dump(include=fields) for e in demo.experts
    ]
    # relative folders resolve against the stack file: the shipped models, the asset root
    assert all(Path(e.model).is_dir() for e in example.experts if e.model)


def test_the_committed_mesh_and_input_are_what_the_code_writes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from poegen.clients.editing_demo import write_inputs

    root = editing.write_assets(tmp_path / "assets")
    assert (root / editing.MESH).read_bytes() == (EXAMPLES / "assets" / editing.MESH).read_bytes()
    written = load_file(write_inputs(tmp_path / "input.safetensors", count=1))
    committed = load_file(EXAMPLES / "input.safetensors")
    assert written.keys() == committed.keys() == {"input", "input-0", "white"}
    for key in written:
        assert torch.equal(written[key], committed[key]), key
    assert torch.equal(committed["input"], editing.held_out_sources(1)[0])


def test_the_render_puts_the_bar_where_the_placement_says(masks: editing.Render) -> None:
    (r0, r1), (c0, c1) = editing.BAR
    bar = torch.zeros(editing.SAMPLE_SHAPE)
    bar[:, r0:r1, c0:c1] = 1
    assert torch.equal(masks.silhouette, bar)
    assert torch.equal(masks.keep, 1 - bar)  # margin 0
    assert torch.equal(masks.insert, editing.OPACITY * bar)


def test_the_graphics_expert_gives_keep_masks_for_a_margin() -> None:
    from poegen.expert_servers.graphics import GraphicsExpert

    expert = GraphicsExpert(EXAMPLES / "assets")
    text = editing.placement_text()
    plain = expert.prepare(Condition(text=text)).render()
    assert "silhouette" not in plain and "keep" not in plain
    out = expert.prepare(Condition(text=text, scalars={"margin": 1.0})).render()
    assert out["silhouette"].shape == (1, 16, 16)
    assert torch.equal(out["silhouette"], plain["mask"][0])
    (r0, r1), (c0, c1) = editing.BAR
    grown = torch.zeros(1, 16, 16)
    grown[:, r0 - 1 : r1 + 1, c0 - 1 : c1 + 1] = 1  # one pixel around, clipped at the border
    assert torch.equal(out["keep"], 1 - grown)
    for bad in (-1.0, 0.5, math.inf, 17.0):
        with pytest.raises(ExpertError) as err:
            expert.prepare(Condition(text=text, scalars={"margin": bad}))
        assert err.value.field == "condition.scalars[margin]"
        assert err.value.code.name == "INVALID_ARGUMENT"
    for scalars in ({"margin": 1.0, "opacity": 0.0}, {"margin": 1.0, "opacity": 1.5},
                    {"opacity": 0.5}):  # fmt: skip
        with pytest.raises(ExpertError) as err:
            expert.prepare(Condition(text=text, scalars=scalars))
        assert err.value.field == "condition.scalars[opacity]"
        assert err.value.code.name == "INVALID_ARGUMENT"
    assert torch.equal(out["insert"], out["silhouette"])  # opacity 1 by default


def test_paste_composite_and_the_metrics(masks: editing.Render) -> None:
    image = torch.full(editing.SAMPLE_SHAPE, -1.0)
    pasted = editing.paste(image, masks.silhouette)
    assert torch.equal(pasted[masks.silhouette.bool()], torch.ones(32))
    assert torch.equal(pasted[~masks.silhouette.bool()], image[~masks.silhouette.bool()])
    assert editing.background_psnr(pasted[None], image, masks.silhouette) == math.inf
    assert editing.stroke_iou(pasted[None], masks).tolist() == [1.0]
    # one pixel outside the mask off by 0.5 (in [0, 1]): MSE = 0.25 / 224
    off = pasted.clone()
    off[0, 15, 0] = 0.0
    expected = 10 * math.log10(224 / 0.25)
    assert editing.background_psnr(off[None], image, masks.silhouette) == pytest.approx(expected)
    # half the bar dark: IoU 16 / 32
    half = pasted.clone()
    half[0, 1:5, 11:15] = -1
    assert editing.stroke_iou(half[None], masks).tolist() == [0.5]
    # the composite is the input exactly where it is kept
    x0 = torch.randn((3, *editing.SAMPLE_SHAPE), generator=torch.Generator().manual_seed(0))
    edited = editing.composite(image, x0, masks.keep)
    keep = masks.keep.bool().expand(edited.shape)
    assert torch.equal(edited[keep], image.expand(edited.shape)[keep])
    assert torch.equal(edited[~keep], x0[~keep])
    # weighted expectations follow the weights
    values = torch.tensor([1.0, 0.0])
    assert editing.weighted_mean(values, torch.tensor([0.0, -math.inf])) == 1.0
    assert editing.weighted_mean(values, None) == 0.5


TABLE_ROW = re.compile(
    r"^(poegen|prior inpainting|paste) +([\d.]+)% +(inf|[\d.]+) +([\d.]+) +(\d+)$", re.M
)


def test_editing_demo_runs_its_jobs_through_a_sampler_and_expert_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fast form of ``poegen demo --app editing``: 8 particles, 4 levels."""
    from helpers.demos import run_fast_demo
    from PIL import Image

    from poegen.clients.editing_demo import INPUTS, run

    out = tmp_path / "editing.png"
    run_fast_demo(run, out, particles=8, steps=4)
    printed = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in TABLE_ROW.finditer(printed)}
    assert set(rows) == {"poegen", "prior inpainting", "paste"}, printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["metric"] == "judge share of the target label"
    assert record["higher_is_better"] is True
    assert set(record["baselines"]) == {"prior inpainting", "paste"}
    shares = [record["poegen"], *record["baselines"].values()]
    assert all(0 <= s <= 1 for s in shares)
    # outside the mask the edits are the input: the composite keeps it exactly
    assert set(record["psnr"].values()) == {math.inf}
    assert record["iou"]["paste"] == 1.0 and 0 <= record["iou"]["poegen"] <= 1
    # equal evaluations: the inpainting within one particle's cost (1 + 4 + 4 and 2·4)
    budget = record["evaluations"]
    spent = record["evaluations_per_method"]
    assert budget - 9 - 8 <= spent["prior inpainting"] <= budget and spent["paste"] == 0
    for method, row in rows.items():
        assert int(row[4]) == spent[method]
    sheet = Image.open(out)
    assert sheet.size[0] > INPUTS * 16 * 4 and sheet.size[1] > 4 * 16 * 4


def test_the_benchmark_runs_every_method_at_equal_evaluations(masks: editing.Render) -> None:
    from poegen.bench import editing as bench

    experts = bench.load_experts()
    settings = editing.settings(0.125).model_copy(update={"num_steps": 4})
    rows = bench.editing_methods(experts, settings, seed=0, masks=masks)
    assert set(rows) == {"poegen", "prior inpainting", "paste"}
    budget = rows["poegen"]["evaluations"]
    assert budget - 9 - 8 <= rows["prior inpainting"]["evaluations"] <= budget
    for row in rows.values():
        assert 0 <= row["judge_share"] <= 1 and 0 <= row["iou"] <= 1
        assert row["psnr"] == math.inf  # composited: the input exactly outside the mask
    assert rows["paste"]["iou"] == 1.0 and rows["paste"]["evaluations"] == 0


def test_the_documented_generate_command_runs_the_example(tmp_path: Path) -> None:
    """``poegen generate examples/editing/spec.yaml --stack examples/editing/stack.yaml -o …``
    (docs/editing.md), as written: the stack's processes, the Sampler, the outputs."""
    from helpers.demos import run_documented_generate
    from safetensors.torch import load_file

    out = tmp_path / "editing"
    run_documented_generate(EXAMPLES, out)
    assert len(list(out.glob("sample_*.png"))) == 8 and (out / "contact_sheet.png").is_file()
    particles = load_file(out / "particles.safetensors")["particles"]
    assert particles.shape == (32, *editing.SAMPLE_SHAPE)
    # the linked masks did their work: outside the bar the clean estimates stay near the
    # input (mean error 0.05 measured), inside it the stroke is inked (mean 0.85; input −1)
    image = load_file(EXAMPLES / "input.safetensors")["input"]
    bar = editing.render(EXAMPLES / "assets").silhouette.bool().expand(particles.shape)
    assert (particles - image)[~bar].abs().mean() < 0.15
    assert image[bar[0]].max() < -0.5 and particles[bar].mean() > 0.5


def test_the_benchmark_command_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m poegen.bench.editing --quick`` (docs/editing.md), in this process."""
    from poegen.bench import editing as bench

    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for method in ("poegen", "prior inpainting", "paste"):
        assert re.search(rf"^{method} +[\d.]+ +nan +inf ", printed, re.M), printed
    assert "total" in printed
