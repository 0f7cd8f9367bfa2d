"""``ClassifierAdapter``: any transformers image classifier as a reward, log p(label | image).

Entry point ``classifier`` of the group ``poegen.backends``::

    poegen serve classifier --model-root /models --model digits-classifier

The folder is a transformers image-classification checkpoint (``config.json`` +
safetensors weights, loadable with ``AutoModelForImageClassification.from_pretrained``) with
its image processor (``preprocessor_config.json``, ``AutoImageProcessor``). Remote code is
never trusted.

The served expert is **discriminative** with ``pixel_input=True``: the sampler decodes each
clean estimate x̂_0 to pixels in [0, 1] (for a pixel-space flow prior,
clamp((x̂_0 + 1)/2, 0, 1)) and calls ``log_potential(pixels)`` with ``(B, C, H, W)``, C the
model's ``num_channels``. The model's own processor resizes and normalises the batch (it is
told the pixels are already floats in [0, 1], so it never rescales by 1/255); a processor that
does not resize refuses any other size than the model's, naming ``x.shape`` (the request field). The
log-potential is

    r(x) = log softmax(logits(processor(x)))[label]          (≤ 0, shape (B,))

Condition (``Prepare``): the label, as ``condition.text`` (a label name of the config's
``id2label``, e.g. ``"three"``, or its id as digits, ``"3"``) or as the scalar
``condition.scalars["label"]`` (an integer id). An unknown label is ``INVALID_ARGUMENT`` on the
field it came in, listing the known names. The unprepared expert has no label and refuses
``LogPotential`` on ``condition``.

Options: ``device`` (a torch device string, default ``cpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poegen.expert_servers.server.adapter import Condition, ModelRef, Progress, ServedModel
from poegen.kernel.experts import ExpertInfo, ExpertKind
from poegen.kernel.refusal import ExpertError, validate_finite

logger = logging.getLogger(__name__)

OPTIONS = frozenset({"device"})


class ClassifierAdapter:
    """Loads an image-classification checkpoint folder (see the module docstring)."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        for name in options:
            if name not in OPTIONS:
                raise ExpertError.invalid(f"options[{name}]", "unknown option (known: device)")
        device = _device(options.get("device", "cpu"))
        folder = _folder(ref)
        progress(0.2, "loading the classifier")
        model, processor = load_classifier(folder, ref)
        expert = ClassifierExpert(
            model.to(device).eval(), processor, model_id=ref.model_id, revision=_revision(folder)
        )
        return ServedModel(expert, concurrent=False)  # a transformers model


def load_classifier(folder: Path, ref: ModelRef) -> tuple[Any, Any]:
    """(model, image processor) of a folder through the Auto classes, no remote code."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise ExpertError.invalid("model_id", f"{ref.model_id!r} has no {name}")
    try:
        model = AutoModelForImageClassification.from_pretrained(
            folder, trust_remote_code=False, use_safetensors=True
        )
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        raise ExpertError.invalid(
            "model_id", f"{ref.model_id!r} is not a transformers image-classification checkpoint"
        ) from None
    return model, processor


class ClassifierExpert:
    """log p(label | pixels) of an image classifier; ``prepare`` picks the label."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        label: int | None = None,
        model_id: str = "",
        revision: str = "",
    ) -> None:
        self.model = model
        self.processor = processor
        self.label = label
        self.channels = int(getattr(model.config, "num_channels", 3))
        self.id2label = {int(i): str(n) for i, n in model.config.id2label.items()}
        name = "classifier" if label is None else f"classifier[{self.id2label[label]}]"
        self._info = ExpertInfo(
            name=name,
            kind=ExpertKind.DISCRIMINATIVE,
            model_id=model_id,
            revision=revision,
            pixel_input=True,
        )

    def describe(self) -> ExpertInfo:
        return self._info

    def prepare(self, condition: Condition) -> ClassifierExpert:
        """The same classifier scoring the condition's label (see the module docstring)."""
        label = label_of(condition, self.id2label)
        return ClassifierExpert(
            self.model, self.processor, label=label,
            model_id=self._info.model_id, revision=self._info.revision,
        )  # fmt: skip

    @torch.no_grad()
    def log_probs(self, pixels: Tensor) -> Tensor:
        """log p(y | pixels) for every label, ``(B, num_labels)``; pixels ``(B, C, H, W)`` in [0, 1]."""
        _check_pixels(pixels, self.channels)
        inputs = self.processor(
            images=pixels.detach().float().cpu(),
            return_tensors="pt",
            input_data_format="channels_first",
            do_rescale=False,
        )
        values = inputs["pixel_values"]
        expected = _model_size(self.model.config)
        if expected is not None and tuple(values.shape[-2:]) != expected:
            raise ExpertError.invalid(
                "x.shape",
                f"images of {list(pixels.shape[-2:])} pixels, the model takes {list(expected)} "
                "and its processor does not resize",
            )
        logits = self.model(pixel_values=values.to(self.model.device, self.model.dtype)).logits
        return logits.float().log_softmax(-1).to(pixels.device)

    def log_potential(self, x0: Tensor) -> Tensor:
        """log p(label | x0), ``(B,)``."""
        if self.label is None:
            raise ExpertError.invalid(
                "condition", "no label: Prepare a condition with text = a label name or id"
            )
        return self.log_probs(x0)[:, self.label].to(x0.dtype)


def label_of(condition: Condition, id2label: Mapping[int, str]) -> int:
    """The label id a condition names (text: name or id; scalar ``label``: id)."""
    if condition.tensors:
        name = next(iter(condition.tensors))
        raise ExpertError.invalid(f"condition.tensors[{name}]", "unknown (known: none)")
    for name in condition.scalars:
        if name != "label":
            raise ExpertError.invalid(f"condition.scalars[{name}]", "unknown (known: label)")
    known = ", ".join(f"{i}={n}" for i, n in sorted(id2label.items()))
    if "label" in condition.scalars:
        if condition.text:
            raise ExpertError.invalid(
                "condition", "give the label as text or as a scalar, not both"
            )
        value = condition.scalars["label"]
        if value != int(value) or int(value) not in id2label:
            raise ExpertError.invalid(
                "condition.scalars[label]", f"unknown label {value} (known: {known})"
            )
        return int(value)
    text = condition.text.strip()
    if not text:
        raise ExpertError.invalid("condition.text", f"a label is required (known: {known})")
    by_name = {n.lower(): i for i, n in id2label.items()}
    if text.lower() in by_name:
        return by_name[text.lower()]
    if text.isdigit() and int(text) in id2label:
        return int(text)
    raise ExpertError.invalid("condition.text", f"unknown label {text!r} (known: {known})")


def _check_pixels(pixels: Tensor, channels: int) -> None:
    if pixels.ndim != 4:
        raise ExpertError.invalid("x.shape", f"{list(pixels.shape)}, expected (B, C, H, W)")
    if pixels.shape[1] != channels:
        raise ExpertError.invalid(
            "x.shape", f"{pixels.shape[1]} channels, the model takes {channels}"
        )
    if pixels.shape[2] < 1 or pixels.shape[3] < 1:
        raise ExpertError.invalid("x.shape", f"{list(pixels.shape)} has an empty image")
    if not pixels.is_floating_point():
        raise ExpertError.invalid("x.dtype", f"{pixels.dtype}, expected floats in [0, 1]")
    validate_finite(pixels, "x")


def _model_size(config: Any) -> tuple[int, int] | None:
    """The input size a model is tied to (ViT-like position embeddings), else ``None``."""
    size = getattr(config, "image_size", None)
    if getattr(config, "model_type", "") not in {"vit", "deit", "beit", "swin", "dinov2"}:
        return None
    if isinstance(size, int):
        return (size, size)
    return tuple(size) if size else None


def _device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ExpertError.invalid("options[device]", "not a torch device string") from None


def _folder(ref: ModelRef) -> Path:
    if ref.path is None or not ref.path.is_dir():
        raise ExpertError.not_found("model_id", f"{ref.model_id!r} is not a model folder")
    return ref.path


def _revision(folder: Path) -> str:
    """A short digest of the folder's config and weights' sizes (changes on a swap)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            if path.suffix == ".json":
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


__all__ = ["ClassifierAdapter", "ClassifierExpert", "label_of", "load_classifier"]
