"""Train the shipped digit experts: three rectified-flow priors and two classifiers.

    python -m poegen.expert_servers.digits.train --out DIR            # the shipped run
    python -m poegen.expert_servers.digits.train --out DIR --flow-steps 3 --classifier-steps 3

needs the ``train`` extra (scikit-learn) and the ``flow`` extra (diffusers, transformers). The
shipped run takes a few minutes on 2 CPU cores; the demo never runs it. It is seeded: one
``torch.Generator`` per model, ``torch.manual_seed`` only for the layers' initialisation.

What it writes under ``DIR`` (each folder loads with ``from_pretrained``):

* ``flow-all``, ``flow-0to4``, ``flow-even``: ``diffusers.UNet2DModel`` predicting the flow
  velocity on 16×16 grey digits in [-1, 1], trained on all digits, on {0..4} and on the even
  digits. The rectified-flow convention of the flow adapter (as diffusers'
  ``FlowMatchEulerDiscreteScheduler``)::

      x_σ = (1 − σ)·x0 + σ·ε,   target v = ε − x0,   timestep input t = 1000·σ,
      loss = ‖model(x_σ, t) − v‖²,  σ ~ U(0, 1)

  with an exponential moving average of the weights (``diffusers.training_utils.EMAModel``),
  the average being what ships.
* ``classifier-reward`` (a ``ResNetForImageClassification``) and ``classifier-judge`` (a
  ``RegNetForImageClassification``): digit classifiers built from a config with random
  weights and trained here with different seeds and architectures, each with a
  ``preprocessor_config.json`` (a ``ViTImageProcessor``: resize to 16×16, normalise
  (p − 0.5)/0.5, so pixels in [0, 1] become the flow models' [-1, 1]). The first is the
  reward of the demo; the second only judges the benchmark, so no figure is graded by the
  expert that steered it. Labels are named ``zero`` … ``nine``.
* ``training.json``: the settings (per model), the held-out test indices of ``load_digits`` (see
  :mod:`.data`), the final losses, test accuracies, sizes and seconds per model.

Only the training split is seen by any model. ``--only NAME …`` retrains the named models and
keeps the other entries of an existing ``training.json`` in ``DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from poegen.expert_servers.digits.data import (
    IMAGE_SIZE,
    SPLIT_SEED,
    Digits,
    load_digits16,
    split_indices,
    subset,
)

logger = logging.getLogger(__name__)

LABEL_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FLOW_CLASSES: dict[str, tuple[int, ...] | None] = {
    "flow-all": None,
    "flow-0to4": (0, 1, 2, 3, 4),
    "flow-even": (0, 2, 4, 6, 8),
    "flow-cond": None,
}
CONDITIONAL_FLOWS = ("flow-cond",)  # the label is the condition (``num_class_embeds`` = 10)
CLASSIFIERS = ("classifier-reward", "classifier-judge")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Settings of one training run (the shipped values are the defaults)."""

    seed: int = 0
    flow_steps: int = 500
    flow_batch: int = 64
    flow_lr: float = 2e-3
    ema_decay: float = 0.995
    flow_channels: tuple[int, ...] = (16, 32, 32)
    classifier_steps: int = 600
    classifier_noise: float = 0.3
    classifier_batch: int = 64
    classifier_lr: float = 2e-3
    threads: int = 2


def build_flow_model(channels: tuple[int, ...], num_classes: int | None = None):
    """A small pixel-space UNet2DModel: 1 channel, 16×16, attention only in the middle; with
    ``num_classes``, a class embedding added to the timestep embedding (diffusers'
    ``num_class_embeds``), so the label is an input: ``model(x, t, class_labels=y)``."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        num_class_embeds=num_classes,
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=channels[-1],
    )


def flow_loss(
    model, x0: Tensor, generator: torch.Generator, labels: Tensor | None = None
) -> Tensor:
    """‖v_θ(x_σ, 1000σ[, y]) − (ε − x0)‖² with σ ~ U(0, 1), x_σ = (1 − σ)·x0 + σ·ε."""
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(x0.shape[0], generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    return F.mse_loss(model(x_sigma, sigma * 1000, class_labels=labels).sample, eps - x0)


def train_flow(
    data: Digits, cfg: TrainConfig, seed: int, conditional: bool = False
) -> tuple[object, float]:
    """Train one flow prior on ``data`` (on its labels too when ``conditional``); returns
    (model with EMA weights, last loss)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = build_flow_model(cfg.flow_channels, len(LABEL_NAMES) if conditional else None)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.flow_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(50, cfg.flow_steps // 10), cfg.flow_steps)
    gen = torch.Generator().manual_seed(seed)
    loss_avg = float("nan")
    for step in range(cfg.flow_steps):
        batch = torch.randint(len(data.x0), (cfg.flow_batch,), generator=gen)
        labels = data.labels[batch] if conditional else None
        loss = flow_loss(model, data.x0[batch], gen, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.step(model.parameters())
        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0:
            logger.info("  step %d/%d loss %.4f", step, cfg.flow_steps, loss_avg)
    ema.copy_to(model.parameters())
    return model.eval(), loss_avg


def build_classifier(name: str):
    """A small random-weight transformers image classifier (ResNet for the reward, RegNet-X
    for the judge), ten labels named zero … nine."""
    from transformers import (
        RegNetConfig,
        RegNetForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )

    labels = dict(
        num_labels=10,
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={n: i for i, n in enumerate(LABEL_NAMES)},
    )
    if name == "classifier-reward":
        config = ResNetConfig(
            num_channels=1,
            embedding_size=32,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
            **labels,
        )
        return ResNetForImageClassification(config)
    config = RegNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 2],
        groups_width=8,
        layer_type="x",
        **labels,
    )
    return RegNetForImageClassification(config)


def build_processor():
    """Resize to 16×16 and map [0, 1] pixels to [-1, 1]; inputs are already floats in [0, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=False,
        do_normalize=True,
        image_mean=[0.5],
        image_std=[0.5],
    )


def augment(x0: Tensor, generator: torch.Generator, noise_std: float) -> Tensor:
    """Shift by up to one pixel and add noise of a random std in [0, noise_std] per image
    (the classifiers read model samples, and a reward must not be fooled by speckle)."""
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x0, shifts=shift, dims=(2, 3))
    noise = (
        torch.randn(x.shape, generator=generator)
        * noise_std
        * torch.rand((x.shape[0], 1, 1, 1), generator=generator)
    )
    return (x + noise).clamp(-1, 1)


def train_classifier(name: str, train: Digits, test: Digits, cfg: TrainConfig, seed: int):
    """Cross-entropy on augmented training digits; returns (model, last loss, test accuracy)."""
    torch.manual_seed(seed)
    model = build_classifier(name)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    loss_avg = float("nan")
    model.train()
    for step in range(cfg.classifier_steps):
        batch = torch.randint(len(train.x0), (cfg.classifier_batch,), generator=gen)
        out = model(
            pixel_values=augment(train.x0[batch], gen, cfg.classifier_noise),
            labels=train.labels[batch],
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss_avg = out.loss.item() if step == 0 else 0.95 * loss_avg + 0.05 * out.loss.item()
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=test.x0).logits.argmax(-1) == test.labels).float().mean()
    return model, loss_avg, float(accuracy)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


@contextlib.contextmanager
def _cpu_training(threads: int) -> Iterator[None]:
    """Torch threads and flush-to-zero for training, restored after: both are process-wide
    (flush-to-zero would break every later subnormal float in the process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny Adam moments as denormals slow CPU math tenfold
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous)


def train_all(out: Path, cfg: TrainConfig, only: tuple[str, ...] | None = None) -> dict:
    """Train every model (or those named in ``only``) into ``out``; returns the record."""
    with _cpu_training(cfg.threads):
        return _train_all(out, cfg, only)


def _train_all(out: Path, cfg: TrainConfig, only: tuple[str, ...] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits16()
    train_idx, test_idx = split_indices(len(digits.labels), seed=SPLIT_SEED)
    train, test = subset(digits, train_idx), subset(digits, test_idx)
    models = _previous_models(out) if only else {}
    for offset, (name, classes) in enumerate(FLOW_CLASSES.items()):
        if only and name not in only:
            continue
        start = time.perf_counter()
        data = subset(digits, train_idx, classes)
        logger.info("%s: %d training digits", name, len(data.labels))
        conditional = name in CONDITIONAL_FLOWS
        model, loss = train_flow(data, cfg, cfg.seed + offset, conditional)
        model.save_pretrained(out / name)
        models[name] = dict(
            kind="flow", classes=list(classes or range(10)), conditional=conditional,
            train_size=len(data.labels),
            final_loss=loss, bytes=folder_bytes(out / name),
            seconds=round(time.perf_counter() - start, 1), config=asdict(cfg),
        )  # fmt: skip
    for offset, name in enumerate(CLASSIFIERS):
        if only and name not in only:
            continue
        start = time.perf_counter()
        model, loss, accuracy = train_classifier(name, train, test, cfg, cfg.seed + 10 + offset)
        model.save_pretrained(out / name)
        build_processor().save_pretrained(out / name)
        logger.info("%s: test accuracy %.4f", name, accuracy)
        models[name] = dict(
            kind="classifier", architecture=type(model).__name__, final_loss=loss,
            test_accuracy=accuracy, bytes=folder_bytes(out / name),
            seconds=round(time.perf_counter() - start, 1), config=asdict(cfg),
        )  # fmt: skip
    record = dict(
        config=asdict(cfg),
        data=dict(source="sklearn.datasets.load_digits", image_size=IMAGE_SIZE,
                  pixels="bilinear upsample of image/16, x0 = 2*pixels - 1",
                  split_seed=SPLIT_SEED, test_indices=test_idx.tolist()),
        models=models,
        total_bytes=sum(m["bytes"] for m in models.values()),
        total_seconds=round(sum(m["seconds"] for m in models.values()), 1),
    )  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _previous_models(out: Path) -> dict[str, dict]:
    """The models an earlier run recorded in ``out`` (kept when ``--only`` retrains some)."""
    path = out / "training.json"
    return dict(json.loads(path.read_text())["models"]) if path.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model folders")
    parser.add_argument("--flow-steps", type=int, default=defaults.flow_steps)
    parser.add_argument("--classifier-steps", type=int, default=defaults.classifier_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--only", nargs="*", help="train only these models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(
        seed=args.seed,
        flow_steps=args.flow_steps,
        classifier_steps=args.classifier_steps,
        threads=args.threads,
    )
    record = train_all(args.out, cfg, tuple(args.only) if args.only else None)
    print(json.dumps({k: v for k, v in record.items() if k != "data"}, indent=1))


if __name__ == "__main__":
    main()
