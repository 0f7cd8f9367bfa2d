"""The video application: the temporal tie, the trajectory's boxes, the autoregressive driver,
the example files, the demo's fast form and the benchmark.

The demo and the benchmark run through a Sampler and expert servers on real gRPC in this
process (:class:`helpers.threaded_stack.ThreadedStack`), one stack for both (it is the slow
part to start); the documented ``poegen generate`` command starts the stack's processes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from poegen.clients.files import load_model_file
from poegen.clients.spec import GenerationSpec, to_request
from poegen.clients.stack import StackConfig
from poegen.expert_servers.digits import video
from poegen.expert_servers.digits.tie import FrameTie
from poegen.expert_servers.masked import MaskedTarget
from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, create_expert
from poegen.kernel.refusal import Code

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "video"
ENDPOINTS = {n: f"127.0.0.1:{i + 1}" for i, n in enumerate(("digit", "background", "tie",
                                                            "reward", "physics"))}  # fmt: skip


def _pair(weight: float = 3.0) -> FrameTie:
    condition = Condition(scalars={"top0": 1, "left0": 2, "top1": 3, "left1": 0})
    return create_expert("frame_tie", size=4, weight=weight).prepare(condition)


# --------------------------------------------------------------------------- the tie


def test_the_pair_tie_is_the_closed_form_noised_gaussian() -> None:
    """d = P₁x₁ − P₀x₀, v_σ = (1 − σ)²/w + 2σ², log q = −‖d‖²/(2v), score = its gradient."""
    w = 3.0
    tie = _pair(w)
    info = tie.describe()
    assert {Capability.SCORE, Capability.LOG_PROB} <= info.capabilities
    x = torch.randn((5, 2, 8, 7), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for s in (0.9, 0.3, 0.0):
        sigma = torch.full((5,), s, dtype=torch.float64)
        d = x[:, 1, 3:7, 0:4] - x[:, 0, 1:5, 2:6]
        v = (1 - s) ** 2 / w + 2 * s**2
        expected = -0.5 * d.flatten(1).square().sum(1) / v
        torch.testing.assert_close(tie.log_prob(x, sigma), expected)
        probe = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(tie.log_prob(probe, sigma).sum(), probe)
        torch.testing.assert_close(tie.score(x, sigma), grad)
    # at σ = 0 the log-potential is the tie on the clean sample: −(w/2)‖d‖²
    d = x[:, 1, 3:7, 0:4] - x[:, 0, 1:5, 2:6]
    torch.testing.assert_close(tie.log_potential(x), -0.5 * w * d.flatten(1).square().sum(1))


def test_the_noised_variance_is_the_law_of_the_noised_difference() -> None:
    """Under the tie d(x0) ~ N(0, I/w); noising each frame, d(x_σ) has variance v_σ."""
    w, s, n = 2.0, 0.4, 200_000
    g = torch.Generator().manual_seed(1)
    d0 = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(w)
    eps = torch.randn((2, n), generator=g, dtype=torch.float64)
    d_sigma = (1 - s) * d0 + s * (eps[1] - eps[0])
    expected = (1 - s) ** 2 / w + 2 * s**2
    assert abs(float(d_sigma.var()) - expected) < 0.01 * expected


def test_the_anchored_tie_is_the_masked_targets_noised_tie_on_the_box() -> None:
    """With a reference r, FrameTie on frame f equals MaskedTarget(score=True) tying frame f's
    box to r: the same closed form from an independent implementation."""
    g = torch.Generator().manual_seed(2)
    ref = torch.randn((4, 4), generator=g)
    tie = FrameTie(4, 5.0).prepare(
        Condition(scalars={"top1": 2, "left1": 3}, tensors={"reference": ref})
    )
    target = torch.zeros((1, 8, 9))
    target[0, 2:6, 3:7] = ref
    mask = torch.zeros((1, 8, 9))
    mask[0, 2:6, 3:7] = 1
    masked = MaskedTarget(target, mask, 5.0, score=True)
    x = torch.randn((3, 1, 8, 9), generator=g)
    for s in (0.8, 0.2):
        sigma = torch.full((3,), s)
        torch.testing.assert_close(tie.score(x, sigma), masked.score(x, sigma))
        torch.testing.assert_close(tie.log_prob(x, sigma), masked.log_prob(x, sigma))


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (Condition(scalars={"top0": 0, "left0": 0, "top1": 0}), "condition.scalars[left1]"),
        (Condition(scalars={"top0": 0, "left0": 0, "top1": 0, "left1": 1.5}),
         "condition.scalars[left1]"),
        (Condition(scalars={"top1": 0, "left1": 0, "size": 3}), "condition.size"),
        (Condition(text="three"), "condition.text"),
        (Condition(scalars={"top1": 0, "left1": 0}, tensors={"reference": torch.zeros(3, 3)}),
         "condition.tensors[reference]"),
        (Condition(scalars={"top0": 0, "left0": 0, "top1": 0, "left1": 0, "weight": -1}),
         "condition.scalars[weight]"),
    ],
)  # fmt: skip
def test_the_tie_refuses_bad_conditions(condition: Condition, field: str) -> None:
    with pytest.raises(ExpertError) as err:
        FrameTie(4).prepare(condition)
    assert err.value.field == field
    assert err.value.code == Code.INVALID_ARGUMENT


def test_the_tie_refuses_calls_it_cannot_answer() -> None:
    with pytest.raises(ExpertError) as err:
        FrameTie(4).score(torch.zeros((1, 2, 8, 8)), torch.ones(1))
    assert err.value.code == Code.FAILED_PRECONDITION
    tie = _pair()
    with pytest.raises(ExpertError, match="takes 2 frame"):
        tie.score(torch.zeros((1, 1, 8, 8)), torch.ones(1))
    with pytest.raises(ExpertError, match="leaves the"):
        tie.score(torch.zeros((1, 2, 5, 5)), torch.ones(1))
    with pytest.raises(ValueError, match="weight"):
        FrameTie(4, 0.0)


# --------------------------------------------------------------------------- trajectory


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The scene's Render from the physics expert (real MuJoCo), once for this module."""
    return video.simulate(video.write_assets(tmp_path_factory.mktemp("assets")))


def test_the_boxes_follow_the_simulated_ball(render: dict[str, torch.Tensor]) -> None:
    """The projected origins against MuJoCo's own segmentation of the ball, frame by frame;
    each box centred on its frame's projection to the nearest pixel."""
    centres = video.trajectory(render)
    assert centres.shape == (video.FRAMES, 2)
    masks = render["masks"][:, 0]  # (F, H, W): the ball's pixels
    rows = torch.arange(video.HEIGHT) + 0.5
    cols = torch.arange(video.WIDTH) + 0.5
    mass = masks.sum((1, 2))
    seen = torch.stack([(masks.sum(1) * cols).sum(1), (masks.sum(2) * rows).sum(1)], 1)
    assert (seen / mass[:, None] - centres).abs().max() < 0.5
    # it falls, is thrown right by the ramp, bounces off the floor and rises again
    assert centres[-1, 0] - centres[0, 0] > 15
    lowest = int(centres[:, 1].argmax())
    assert 0 < lowest < video.FRAMES - 1 and centres[-1, 1] < centres[lowest, 1] - 3
    boxes = video.boxes(centres)
    for box, (u, v) in zip(boxes, centres.tolist(), strict=True):
        assert 0 <= box.top <= video.HEIGHT - 16 and 0 <= box.left <= video.WIDTH - 16
        assert abs(box.left + 8 - u) <= 0.5 and abs(box.top + 8 - v) <= 0.5
    region = video.background_region(boxes)
    assert region.shape == video.CANVAS
    assert int((1 - region).sum()) == video.FRAMES * 256


def test_the_committed_scene_is_the_scene() -> None:
    assert (EXAMPLES / "assets" / video.SCENE_FILE).read_text() == video.SCENE


def test_the_metrics_of_a_digit_pasted_on_the_trajectory(render: dict[str, torch.Tensor]) -> None:
    """A held-out 3 pasted into every box: no appearance change, centroids within the digit's
    own offset from its box centre."""
    from poegen.expert_servers.digits import compose, held_out_indices
    from poegen.expert_servers.digits.data import load_digits16

    digits = load_digits16()
    idx = torch.tensor(held_out_indices())
    three = digits.x0[idx[digits.labels[idx] == 3][0]]  # (1, 16, 16)
    centres = video.trajectory(render)
    boxes = video.boxes(centres)
    clip = torch.full(video.CANVAS, -1.0)
    for f, box in enumerate(boxes):
        box.of(clip[f]).copy_(three[0])
    judge = compose.load_judge()
    scores = video.video_metrics(judge, clip, boxes, centres)
    assert scores["appearance_change"] == 0.0
    own = video.centroids(three)[0] - 8  # the digit's ink centroid off its box centre
    assert abs(scores["centroid_error_px"] - float(own.norm())) < 0.75
    assert scores["label_consistency"] in (0.0, 1.0)
    blank = video.video_metrics(judge, torch.full(video.CANVAS, -1.0), boxes, centres)
    assert blank["centroid_error_px"] == pytest.approx(math.hypot(32, 48))


# --------------------------------------------------------------------------- the driver


def test_chunks_cut_the_video() -> None:
    from poegen.clients.autoregressive import Chunk, chunks

    assert chunks(10, 4) == (Chunk(0, 0, 4), Chunk(1, 4, 8), Chunk(2, 8, 10))
    assert chunks(3, 8) == (Chunk(0, 0, 3),)
    with pytest.raises(ValueError, match="chunk_size"):
        chunks(3, 0)


PRIOR = {"means": [[0.0]], "covariances": [[[1.0]]], "weights": [1.0], "name": "prior",
         "sample_shape": [1]}  # fmt: skip
TIE_WEIGHT = 4.0


@pytest.fixture(scope="module")
def analytic_stack() -> Iterator[Any]:
    """A 1-D prior N(0, 1) per frame and a scored tie to a reference, on real gRPC."""
    from helpers.threaded_stack import ThreadedStack

    mapping = {
        "experts": [
            {"name": "prior", "backend": "analytic", "expert": "gaussian_mixture",
             "params": PRIOR},
            {"name": "tie", "backend": "analytic", "expert": "masked_target",
             "params": {"target": [0.0], "weight": TIE_WEIGHT, "score": True,
                        "propose": False, "name": "tie"}},
        ],
        "sampler": {"max_jobs": 1},
    }  # fmt: skip
    with ThreadedStack(mapping) as stack:
        yield stack


def _analytic_spec(tmp: Path, chunk: Any, made: torch.Tensor | None) -> dict[str, Any]:
    """Frames [start, stop) of a 1-D video: a prior per frame; the first frame tied to the
    last made frame (MaskedTarget's noised tie: its target the reference)."""
    from poegen.clients.autoregressive import tensor_file

    experts: list[dict[str, Any]] = [
        {"endpoint": "prior", "name": f"prior-{chunk.start + i}", "crop": [(i, i + 1)]}
        for i in range(chunk.frames)
    ]
    if made is not None:
        target = tensor_file(tmp, f"ref-{chunk.start}", made[-1:].clone())
        experts.append({"endpoint": "tie", "name": "tie", "crop": [(0, 1)],
                        "condition": {"tensors": {"target": target}}})  # fmt: skip
    return {
        "seed": 7 + chunk.index, "sample_shape": [chunk.frames],
        "settings": {"num_particles": 512, "num_steps": 20, "mcmc_steps": 2,
                     "step_size": 0.3, "transition": "fk"},
        "experts": experts, "output": {"decode": "none"},
    }  # fmt: skip


def test_one_chunk_is_the_joint_job(analytic_stack: Any, tmp_path: Path) -> None:
    """chunk_size >= frames: the driver runs exactly the joint job (bit for bit)."""
    from poegen.clients.autoregressive import Chunk, generate_autoregressive
    from poegen.clients.sdk import Client

    with Client.from_stack(analytic_stack) as client:
        made = generate_autoregressive(client, lambda c, m: _analytic_spec(tmp_path, c, m), 3, 5)
        joint = client.generate(
            GenerationSpec.from_mapping(_analytic_spec(tmp_path, Chunk(0, 0, 3), None))
        )
    assert made.chunks == (Chunk(0, 0, 3),)
    assert torch.equal(made.frames, joint.particles[joint.best_index])
    assert made.evaluations == sum(s for e in joint.trace for (_, _, s) in e.timings.values())


def test_each_chunk_is_conditioned_on_the_frames_made(analytic_stack: Any, tmp_path: Path) -> None:
    """Chunk k targets N(0, 1)·N(x; r, 1/w) on its first frame given the last made frame r:
    the Gaussian of mean w·r/(1 + w), variance 1/(1 + w); its other frames stay N(0, 1)."""
    from poegen.clients.autoregressive import generate_autoregressive
    from poegen.clients.sdk import Client

    seen: list[torch.Tensor | None] = []

    def spec_for(chunk: Any, made: torch.Tensor | None) -> dict[str, Any]:
        seen.append(None if made is None else made.clone())
        return _analytic_spec(tmp_path, chunk, made)

    with Client.from_stack(analytic_stack, in_process=True) as client:
        out = generate_autoregressive(client, spec_for, 5, 2)
    assert [c.frames for c in out.chunks] == [2, 2, 1]
    assert seen[0] is None
    for k, result in enumerate(out.results):
        picked = result.particles[out.picked[k]]
        torch.testing.assert_close(out.frames[2 * k : 2 * k + picked.shape[0]], picked)
        if k:
            assert torch.equal(seen[k], out.frames[: 2 * k])  # the frames made so far
            r = float(seen[k][-1])
            w = result.log_weights.exp().double()
            first = result.particles[:, 0].double()
            mean = float((w * first).sum())
            var = float((w * (first - mean) ** 2).sum())
            assert mean == pytest.approx(TIE_WEIGHT * r / (1 + TIE_WEIGHT), abs=0.12)
            assert var == pytest.approx(1 / (1 + TIE_WEIGHT), rel=0.3)


def test_the_driver_refuses_a_spec_of_the_wrong_length(analytic_stack: Any, tmp_path: Path) -> None:
    from poegen.clients.autoregressive import Chunk, generate_autoregressive

    def wrong(chunk: Chunk, made: torch.Tensor | None) -> dict[str, Any]:
        return _analytic_spec(tmp_path, Chunk(chunk.index, 0, chunk.frames + 1), made)

    with pytest.raises(ValueError, match="needs a sample_shape with 2 frames"):
        generate_autoregressive(object(), wrong, 4, 2)


# --------------------------------------------------------------------------- example files


def test_the_example_spec_is_the_first_chunk_the_demo_runs(
    render: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from poegen.clients.autoregressive import Chunk
    from poegen.clients.video_demo import VideoJobs

    example = GenerationSpec.from_file(EXAMPLES / "spec.yaml")
    jobs = VideoJobs(tmp_path, video.boxes(video.trajectory(render)), 16, 12)
    demo = GenerationSpec.from_mapping(jobs.chunk(Chunk(0, 0, video.CHUNK), None))
    shape = [video.CHUNK, video.HEIGHT, video.WIDTH]
    assert example.sample_shape == shape
    assert to_request(example, shape, ENDPOINTS) == to_request(demo, shape, ENDPOINTS)


def test_the_example_stack_is_the_stack_the_demo_starts(tmp_path: Path) -> None:
    from poegen.clients.video_demo import stack_mapping

    example = load_model_file(StackConfig, EXAMPLES / "stack.yaml")
    demo = StackConfig.model_validate(stack_mapping(EXAMPLES / "assets"))
    fields = ("name", "backend", "expert", "params", "latent_space")
    assert [e.model_dump(include=set(fields)) for e in example.experts] == [
        e.model_dump(include=set(fields)) for e in demo.experts
    ]
    models = [Path(e.model).resolve() for e in example.experts if e.model]
    assert models == [Path(e.model).resolve() for e in demo.experts if e.model]
    assert all(m.is_dir() for m in models)


# --------------------------------------------------------------------------- demo and bench


@pytest.fixture(scope="module")
def digits_stack() -> Iterator[Any]:
    """The video stack on real gRPC in this process, shared by the demo and the bench."""
    import tempfile

    from helpers.threaded_stack import ThreadedStack

    from poegen.clients.video_demo import stack_mapping

    with tempfile.TemporaryDirectory(prefix="poegen-test-video-") as tmp:
        root = video.write_assets(Path(tmp) / "assets")
        with ThreadedStack(stack_mapping(root)) as stack:
            yield stack


def _reuse(stack: Any) -> Any:
    @contextlib.contextmanager
    def start(mapping: Any) -> Iterator[Any]:
        yield stack

    return start


TABLE_ROW = re.compile(r"^(poegen|joint|independent frames) +([\d.]+)% +([\d.]+) +([\d.]+) +(\d+)$",
                       re.M)  # fmt: skip


def test_the_video_demo_runs_through_a_sampler_and_expert_servers(
    digits_stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fast form of ``poegen demo --app video``: 4 particles, 2 levels."""
    from helpers.demos import run_fast_demo
    from PIL import Image

    from poegen.clients.demo import APPS
    from poegen.clients.video_demo import run

    assert "video" in APPS
    out = tmp_path / "video.png"
    run_fast_demo(run, out, particles=4, steps=2, start_stack=_reuse(digits_stack))
    printed = capsys.readouterr().out
    rows = {m.group(1): m.groups() for m in TABLE_ROW.finditer(printed)}
    assert set(rows) == {"poegen", "joint", "independent frames"}, printed
    text = out.with_suffix(".json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    record = json.loads(text)
    assert record["metric"] == "frame-to-frame appearance change"
    assert record["higher_is_better"] is False
    assert set(record["baselines"]) == {"joint", "independent frames"}
    assert all(0 <= v <= 1 for v in [record["poegen"], *record["baselines"].values()])
    assert all(0 <= v <= 1 for v in record["label_consistency"].values())
    assert all(0 <= v <= math.hypot(32, 48) for v in record["centroid_error_px"].values())
    # equal evaluations: each baseline within one particle's cost of poegen's budget
    budget = record["evaluations"]
    for method, evaluations in record["evaluations_per_method"].items():
        assert 0.8 * budget <= evaluations <= budget, method
        assert int(rows[method][4]) == evaluations
    sheet = Image.open(out)
    assert sheet.size[0] > video.FRAMES * video.WIDTH * 3 and sheet.size[1] > 3 * video.HEIGHT * 3
    import imageio.v2 as imageio

    frames = imageio.mimread(out.with_suffix(".mp4"))
    assert len(frames) == video.FRAMES
    assert frames[0].shape[:2] == (video.HEIGHT * 4, video.WIDTH * 4)


def test_the_benchmark_command_writes_its_table_and_json(
    digits_stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m poegen.bench.video --quick`` (docs/video.md), the stack in this process."""
    from poegen.bench import provenance
    from poegen.bench import video as bench

    out = tmp_path / "video.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--threads", "1", "--out", str(out)],
                   start_stack=_reuse(digits_stack))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "independent frames" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data["provenance"]["measures"] == list(provenance.MEASURES["video"])
    assert data["metric"] == "frame-to-frame appearance change"
    assert data["higher_is_better"] is False
    assert set(data["baselines"]) == {"joint", "independent frames"}
    assert set(data["methods"]) == {"poegen", "joint", "independent frames"}
    assert set(data["targets"]) == {"centroid_error_px <= 2", "label_consistency >= 0.9"}


def test_the_documented_generate_command_runs_the_example(tmp_path: Path) -> None:
    """``poegen generate examples/video/spec.yaml --stack examples/video/stack.yaml -o …``
    (docs/video.md), as written: the stack's processes, the Sampler, the outputs."""
    from helpers.demos import run_documented_generate
    from safetensors.torch import load_file

    out = tmp_path / "video"
    run_documented_generate(EXAMPLES, out, timeout_s=900)
    particles = load_file(out / "particles.safetensors")["particles"]
    assert particles.shape == (16, video.CHUNK, video.HEIGHT, video.WIDTH)


def test_the_docs_show_the_example_files_and_the_commands_the_tests_run() -> None:
    """docs/video.md: its stack block is examples/video/stack.yaml's experts, its spec block's
    experts are the example spec's, and its commands are those run above (the demo's fast form,
    the benchmark's main, the slow ``poegen generate`` test)."""
    import yaml

    page = (EXAMPLES.parents[1] / "docs" / "video.md").read_text()
    stack_block, spec_block = re.findall(r"```yaml\n(.*?)```", page, re.S)
    example_stack = yaml.safe_load((EXAMPLES / "stack.yaml").read_text())
    assert yaml.safe_load(stack_block)["experts"] == example_stack["experts"]
    example_spec = yaml.safe_load((EXAMPLES / "spec.yaml").read_text())
    shown = yaml.safe_load(spec_block)
    assert all(e in example_spec["experts"] for e in shown["experts"])
    assert {k: shown[k] for k in ("sample_shape", "settings", "output")} == {
        k: example_spec[k] for k in ("sample_shape", "settings", "output")
    }
    prose = re.sub(r"```.*?```", "", page, flags=re.S)  # the indented commands, not the code
    commands = {
        line.split("#")[0].strip()
        for line in re.findall(r"^    ((?:poegen|python) .*)$", prose, re.M)
    }
    assert commands == {
        "poegen demo --app video",
        "poegen generate examples/video/spec.yaml --stack examples/video/stack.yaml -o out/video",
        "python -m poegen.bench.video",
        "python -m poegen.bench.apps",  # run by test_layout's benchmark test (docs/layout.md's)
    }
