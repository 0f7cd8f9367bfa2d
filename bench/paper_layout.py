"""Metrics of the paper's layout recipe (``examples/paper/layout``, ``docs/paper-layout.md``).

:func:`measure` reads a run's output folder (what ``poegen generate`` or ``generate.py``
writes: ``sample_NNN.png`` best first, ``particles.safetensors``, ``trace.json``) and the
recipe's ``spec.yaml`` and stacks, and gives, over the decoded samples:

* ``samples``: how many ``sample_NNN.png`` were scored;
* ``vqascore``, ``vqascore_log``: the mean P(Yes) and the mean log P(Yes) of a **judge** VLM
  asked the spec's full prompt ('Does this figure show "…"? Please answer Yes or No.') about
  each sample, the paper's VQAScore. The judge is a model folder the caller gives, loaded in
  this process through the project's own VLM code (``VLMAdapter``, ``docs/vlm.md``); it must not
  be the reward's model (any ``vlm``/``vllm`` expert of the recipe's stacks), since the reward
  was maximised during sampling and would grade its own answers;
* ``box_iou``, ``box_found``: for every box factor of the spec (a ``region.box`` with its
  sub-prompt), a **detector** the caller gives is asked for the sub-prompt's object in each
  sample; IoU of what it found against the box (0 when it found nothing), the mean over boxes
  and samples, and the fraction of them found with IoU ≥ 0.5; ``box_iou_<factor>``, the mean
  per box.

The spec's boxes are latent cells; a cell is ``width / sample_shape[-1]`` pixels of the decoded
sample (8 for FLUX at 1024², 2 for the tests' tiny VAE), taken from the files rather than
assumed, so a shrunk recipe is measured with the same code.

A :class:`Detector` is any callable ``(image, phrase) -> (top, left, bottom, right) | None``;
:class:`TransformersDetector` wraps a zero-shot object-detection folder (OWL-ViT, OWLv2,
Grounding DINO). ``python -m poegen.bench.apps_checkpoints`` runs this with the other two
recipes' metrics (``docs/paper-layout.md``, "Metrics on real checkpoints").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import yaml
from torch import Tensor

from poegen.bench.paper_editing import read_image

if TYPE_CHECKING:
    from poegen.expert_servers.vlm import VQAReward

Box = tuple[
    float, float, float, float
]  # (top, left, bottom, right), pixels, bottom/right exclusive
REWARD_BACKENDS = ("vlm", "vllm")
FOUND_IOU = 0.5  # the usual detection threshold: a box "found" at IoU ≥ 0.5


class Detector(Protocol):
    """Finds ``phrase`` in ``image`` (``(3, H, W)`` float in [0, 1]): its most confident box as
    ``(top, left, bottom, right)`` in pixels, or ``None`` when it finds nothing."""

    def __call__(self, image: Tensor, phrase: str) -> Box | None: ...


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(top, left, bottom, right)`` boxes; 0 when both are
    empty (nothing found and nothing to find is not a match of a box)."""
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, bottom - top) * max(0.0, right - left)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BoxFactor:
    """A box factor of the spec: its name, sub-prompt and box in latent cells."""

    name: str
    phrase: str
    box: Box  # (top, left, bottom, right) in latent cells


@dataclass(frozen=True, slots=True)
class Layout:
    """What the metrics need from a recipe folder."""

    prompt: str
    boxes: tuple[BoxFactor, ...]
    latent_size: tuple[int, int]  # (rows, columns) of the latent grid
    reward_models: tuple[Path, ...]  # the resolved folders of the stacks' VLM rewards


def read_layout(recipe: Path) -> Layout:
    """The full prompt (the reward factor's), the box factors and the reward models of
    ``recipe``; a box factor's ``box`` tensor, when it has one, must be its region."""
    from poegen.clients.spec import GenerationSpec

    stacks = sorted(recipe.glob("stack*.yaml"))
    rewards: dict[str, list[Path]] = {}
    for stack_file in stacks:
        stack = yaml.safe_load(stack_file.read_text()) or {}
        for expert in stack.get("experts", []):
            if expert.get("backend") in REWARD_BACKENDS and expert.get("model"):
                path = (stack_file.parent / str(expert["model"])).resolve()
                rewards.setdefault(expert["name"], []).append(path)
    spec = GenerationSpec.from_file(recipe / "spec.yaml")
    prompts = [
        e.condition.text
        for e in spec.experts
        if e.endpoint in rewards and e.condition is not None and e.condition.text
    ]
    if not prompts:
        raise ValueError(f"{recipe / 'spec.yaml'}: no factor served by a VLM reward of the stacks")
    boxes = []
    for expert in spec.experts:
        if expert.region is None or expert.region.box is None:
            continue
        (top, bottom), (left, right) = expert.region.box[-2:]
        tensors = expert.condition.tensors if expert.condition is not None else {}
        if "box" in tensors:  # the FLUX crop: [top, left, height, width]
            t, lft, h, w = tensors["box"].load().tolist()
            if (t, lft, t + h, lft + w) != (top, left, bottom, right):
                raise ValueError(
                    f"{expert.label}: its box tensor {[t, lft, h, w]} is not its region"
                )
        text = expert.condition.text if expert.condition is not None else ""
        boxes.append(BoxFactor(str(expert.label), text, (top, left, bottom, right)))
    rows, columns = spec.sample_shape[-2:]
    return Layout(
        prompt=prompts[0],
        boxes=tuple(boxes),
        latent_size=(rows, columns),
        reward_models=tuple(p for paths in rewards.values() for p in paths),
    )


def load_judge(judge: Path, layout: Layout, options: Mapping[str, str] | None = None) -> VQAReward:
    """The judge folder as a VQAScore expert (``VLMAdapter``), refused when it is a reward."""
    from poegen.expert_servers.server import ModelRef
    from poegen.expert_servers.vlm import VLMAdapter
    from poegen.kernel.refusal import ExpertError

    folder = judge.resolve()  # a symlink to the reward's folder is the reward
    if folder in layout.reward_models:
        raise ValueError(
            f"judge: {judge} is the reward's own model; VQAScore must be judged by another VLM"
        )
    if not folder.is_dir():
        raise ValueError(f"judge: {judge} is not a model folder")
    try:
        served = VLMAdapter().load(ModelRef(judge.name, folder), dict(options or {}), _quiet)
    except ExpertError as err:
        raise ValueError(f"judge: {err}") from None
    return served.expert


def _quiet(fraction: float, message: str) -> None:
    """A load's progress, unshown: the table is the output."""


def measure(
    recipe: Path,
    outputs: Path,
    *,
    judge: Path | None = None,
    detector: Detector | None = None,
    judge_options: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """The metrics of the module docstring for the run in ``outputs`` of ``recipe``."""
    from poegen.expert_servers.server import Condition

    layout = read_layout(recipe)
    paths = sorted(outputs.glob("sample_*.png"))
    if not paths:
        raise ValueError(f"{outputs}: no sample_NNN.png")
    images = [read_image(p).float() for p in paths]
    height, width = images[0].shape[1:]
    rows, columns = layout.latent_size
    if height % rows or width % columns or height // rows != width // columns:
        raise ValueError(
            f"{paths[0].name}: {width}×{height} pixels is no scale of {rows}×{columns} cells"
        )
    cell = height // rows
    out: dict[str, float] = {"samples": float(len(images))}
    if judge is not None:
        # the judge is loaded before any sample is checked against it: a refusal costs nothing
        expert = load_judge(judge, layout, judge_options)
        log_yes = expert.prepare(Condition(text=layout.prompt)).log_potential(torch.stack(images))
        out["vqascore"] = float(log_yes.exp().mean())
        out["vqascore_log"] = float(log_yes.mean())
    if detector is not None and layout.boxes:
        hits: list[float] = []
        for factor in layout.boxes:
            top, left, bottom, right = (float(v * cell) for v in factor.box)
            truth: Box = (top, left, bottom, right)
            scores = [_found_iou(detector(image, factor.phrase), truth) for image in images]
            out[f"box_iou_{factor.name}"] = sum(scores) / len(scores)
            hits.extend(scores)
        out["box_iou"] = sum(hits) / len(hits)
        out["box_found"] = sum(s >= FOUND_IOU for s in hits) / len(hits)
    return out


def _found_iou(found: Box | None, truth: Box) -> float:
    if found is None:
        return 0.0
    if len(found) != 4:
        raise ValueError(f"detector: a box is (top, left, bottom, right), got {found!r}")
    top, left, bottom, right = (float(v) for v in found)
    return box_iou((top, left, bottom, right), truth)


class TransformersDetector:
    """A zero-shot object-detection folder (OWL-ViT, OWLv2, Grounding DINO) as a
    :class:`Detector`: ``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection`` from the
    folder only (safetensors, no remote code), the most confident box for the phrase, ``None``
    when its score is below ``threshold``.

    The boxes are decoded here, not by the processors' post-processing (whose names and
    arguments differ between the three families and across transformers releases): each
    query's score is the sigmoid of its logit for the phrase (the best over the phrase's tokens
    for Grounding DINO), its box ``pred_boxes`` (cx, cy, w, h) normalised to the image the model
    saw: the image itself for OWL-ViT (resized, not cropped) and Grounding DINO (one image, no
    batch padding), its square padding at the bottom and right for OWLv2.
    """

    def __init__(
        self, folder: Path, *, threshold: float = 0.1, device: str = "cpu", dtype: str = "float32"
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not Path(folder).is_dir():
            raise ValueError(f"detector: {folder} is not a model folder")
        try:
            self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
                folder, trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"detector: {folder}: {err}") from None
        self.model.eval().to(device)
        self.device = device
        self.threshold = threshold
        self.family = str(self.model.config.model_type)

    def __call__(self, image: Tensor, phrase: str) -> Box | None:
        import numpy as np

        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"detector: an image is (3, H, W), got {tuple(image.shape)}")
        height, width = image.shape[1:]
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        array = np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
        if self.family == "grounding-dino":  # its prompts are lower-case phrases ending in "."
            text: object = phrase.lower().rstrip(". ") + "."
            padding: dict[str, object] = {"padding": True}
        else:
            text = [[phrase]]
            # OWL's text tower has a fixed number of positions (16): pad to it and cut longer
            # phrases, as its processor's own default does
            length = self.model.config.text_config.max_position_embeddings
            padding = {"padding": "max_length", "truncation": True, "max_length": length}
        inputs = self.processor(text=text, images=[array], return_tensors="pt", **padding)
        inputs = inputs.to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        logits = outputs.logits[0].float()  # (queries, phrases or text tokens)
        scores = (
            logits.sigmoid().amax(-1) if self.family == "grounding-dino" else logits[:, 0].sigmoid()
        )
        best = int(scores.argmax())
        if float(scores[best]) < self.threshold:
            return None
        cx, cy, w, h = outputs.pred_boxes[0, best].float().tolist()
        sx, sy = (max(width, height),) * 2 if self.family == "owlv2" else (width, height)
        top, bottom = max(0.0, (cy - h / 2) * sy), min(float(height), (cy + h / 2) * sy)
        left, right = max(0.0, (cx - w / 2) * sx), min(float(width), (cx + w / 2) * sx)
        return (top, left, bottom, right)


__all__ = [
    "Box",
    "BoxFactor",
    "Detector",
    "Layout",
    "TransformersDetector",
    "box_iou",
    "load_judge",
    "measure",
    "read_layout",
]
