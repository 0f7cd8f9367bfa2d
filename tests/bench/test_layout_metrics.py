"""``bench/paper_layout.py``: the box IoU, the recipe's boxes, the detector interface and its
transformers wrapper on a tiny random OWL-ViT, the judge's refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.app_outputs import LAYOUT_PIXELS, PAPER, copy_recipes, write_run
from helpers.detector_models import save_owlvit

from poegen.bench.paper_layout import (
    TransformersDetector,
    box_iou,
    measure,
    read_layout,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shrunk layout recipe (16×16 latent cells) and a run of 3 samples of 32×32."""
    root = tmp_path_factory.mktemp("layout-metrics")
    recipe = copy_recipes(root) / "layout"
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    write_run(root / "out", recipe / "spec.yaml", pixels)
    return recipe, root / "out"


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),  # a 5×5 overlap of two 10×10 boxes
        ((0, 0, 10, 10), (0, 0, 5, 10), 0.5),  # half of it, inside it
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges: bottom/right exclusive
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((2, 4, 6, 8), (3, 5, 9, 7), 6 / 22),  # 3×2 overlap, areas 16 and 12
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # nothing is no match
    ],
)
def test_box_iou_against_hand_computed_boxes(a, b, expected) -> None:
    assert box_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_the_shipped_recipe_reads_as_its_page_describes() -> None:
    layout = read_layout(PAPER / "layout")
    assert layout.prompt == "a red apple to the left of a blue teacup on a wooden table"
    assert [(b.name, b.phrase, b.box) for b in layout.boxes] == [
        ("apple", "a red apple on a wooden table", (48, 16, 112, 64)),
        ("teacup", "a blue teacup on a wooden table", (48, 64, 112, 112)),
    ]
    assert layout.latent_size == (128, 128)
    reward = (PAPER / "layout" / "models" / "Qwen2.5-VL-7B-Instruct").resolve()
    assert reward in layout.reward_models


def test_a_detector_that_returns_the_true_box_scores_one(run: tuple[Path, Path]) -> None:
    """A plain function is a detector: given each factor's box (cells × 2 pixels), IoU 1 and
    every box found; one that finds nothing scores 0; one box off by half scores 1/3."""
    recipe, out = run
    truth = {
        b.phrase: tuple(float(v * LAYOUT_PIXELS) for v in b.box) for b in read_layout(recipe).boxes
    }
    seen: list[tuple[tuple[int, ...], str]] = []

    def true_box(image: torch.Tensor, phrase: str):
        seen.append((tuple(image.shape), phrase))
        assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
        return truth[phrase]

    figures = measure(recipe, out, detector=true_box)
    assert figures["samples"] == 3
    assert figures["box_iou"] == 1.0 and figures["box_found"] == 1.0
    assert figures["box_iou_apple"] == figures["box_iou_teacup"] == 1.0
    assert sorted(seen) == sorted([((3, 32, 32), p) for p in truth] * 3)
    assert truth["a red apple on a wooden table"] == (12.0, 4.0, 28.0, 16.0)
    assert "vqascore" not in figures  # no judge given, no VQAScore
    nothing = measure(recipe, out, detector=lambda image, phrase: None)
    assert nothing["box_iou"] == 0.0 and nothing["box_found"] == 0.0

    def half_off(image: torch.Tensor, phrase: str):
        top, left, bottom, right = truth[phrase]
        shift = (right - left) / 2  # the same box, moved right by half its width
        return (top, left + shift, bottom, right + shift) if "apple" in phrase else truth[phrase]

    shifted = measure(recipe, out, detector=half_off)
    assert shifted["box_iou_apple"] == pytest.approx(1 / 3)  # overlap ½, union 1½
    assert shifted["box_iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert shifted["box_found"] == 0.5


def test_the_transformers_detector_on_a_tiny_owlvit(run: tuple[Path, Path], tmp_path: Path) -> None:
    """A random OWL-ViT folder through AutoProcessor + AutoModelForZeroShotObjectDetection: a
    box of 4 floats inside the image for any size, None above any score, and measure's IoU the
    mean of box_iou over what it found."""
    recipe, out = run
    detector = TransformersDetector(save_owlvit(tmp_path / "owlvit"))
    assert detector.family == "owlvit"
    image = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(2))
    box = detector(image, "a red apple")
    assert isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, float) for v in box)
    top, left, bottom, right = box
    assert 0 <= top <= bottom <= 40 and 0 <= left <= right <= 48
    assert detector(image, "a red apple") == box  # eval mode: the same answer twice
    sure = TransformersDetector(tmp_path / "owlvit", threshold=1.01)  # above any sigmoid
    assert sure(image, "a red apple") is None
    figures = measure(recipe, out, detector=detector)
    layout = read_layout(recipe)
    from poegen.bench.paper_editing import read_image

    images = [read_image(p).float() for p in sorted(out.glob("sample_*.png"))]
    by_hand = [
        box_iou(detector(x, b.phrase), tuple(float(v * LAYOUT_PIXELS) for v in b.box))
        for b in layout.boxes
        for x in images
    ]
    assert figures["box_iou"] == pytest.approx(sum(by_hand) / len(by_hand))
    assert figures["box_found"] == sum(s >= 0.5 for s in by_hand) / len(by_hand)
    assert 0 <= figures["box_iou"] <= 1
    with pytest.raises(ValueError, match=r"^detector: "):
        TransformersDetector(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"^detector: "):
        detector(torch.rand(1, 8, 8), "a red apple")


def test_the_judge_must_not_be_the_reward(run: tuple[Path, Path], tmp_path: Path) -> None:
    """The stack's reward folder, through a symlink or not, is refused before loading."""
    recipe, out = run
    target = tmp_path / "somewhere"
    target.mkdir()
    (recipe / "models").mkdir(exist_ok=True)
    reward = recipe / "models" / "Qwen2.5-VL-7B-Instruct"
    if not reward.exists():
        reward.symlink_to(target, target_is_directory=True)
    for judge in (reward, target):
        with pytest.raises(ValueError, match=r"^judge: .*reward"):
            measure(recipe, out, judge=judge)
    with pytest.raises(ValueError, match=r"^judge: .*not a model folder"):
        measure(recipe, out, judge=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no sample_NNN\.png"):
        measure(recipe, tmp_path, judge=tmp_path / "missing")
