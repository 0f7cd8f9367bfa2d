"""The digits data: scikit-learn's ``load_digits`` upsampled to 16×16, and its fixed split.

``load_digits`` ships 1797 grey 8×8 images (values 0..16) inside scikit-learn, so nothing is
downloaded. Every model of this package sees them as

    pixels = bilinear_upsample(image / 16, 16×16)        in [0, 1]   (what rewards read)
    x0     = 2 · pixels − 1                               in [-1, 1]  (what flow models read)

The split is a seeded permutation: the first ``TEST_SIZE`` indices are held out (completion
targets and judging in the demo and the benchmark), the rest train every model. The shipped
``training.json`` records the test indices, so the split never depends on this code staying
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
TEST_SIZE = 297
SPLIT_SEED = 0


@dataclass(frozen=True, slots=True)
class Digits:
    """Images and labels of the whole set.

    Attributes:
        x0: ``(1797, 1, 16, 16)`` pixels in [-1, 1].
        labels: ``(1797,)`` int64 digit classes.
    """

    x0: Tensor
    labels: Tensor


def load_digits16() -> Digits:
    """All 1797 digits, upsampled to 16×16, in [-1, 1] (needs scikit-learn)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return Digits(x0=pixels.clamp(0, 1) * 2 - 1, labels=torch.tensor(raw.target, dtype=torch.long))


def split_indices(
    n: int, *, seed: int = SPLIT_SEED, test_size: int = TEST_SIZE
) -> tuple[Tensor, Tensor]:
    """(train, test) index tensors, each sorted; a seeded permutation of ``range(n)``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[test_size:].sort().values, perm[:test_size].sort().values


def subset(digits: Digits, indices: Tensor, classes: tuple[int, ...] | None = None) -> Digits:
    """The digits at ``indices`` whose label is in ``classes`` (all classes if ``None``)."""
    x0, labels = digits.x0[indices], digits.labels[indices]
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        x0, labels = x0[keep], labels[keep]
    return Digits(x0=x0, labels=labels)
