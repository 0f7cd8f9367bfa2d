"""The background expert: the law of an empty canvas, exact on the flow path.

An empty canvas is black: every pixel near −1 (pixels in [-1, 1]). :class:`BlankCanvas` is the
Gaussian x0 ~ N(−1, s²·I) over a ``(1, height, width)`` canvas, a
:class:`~poegen.expert_servers.analytic.GaussianMixture` with one diagonal component, so its
velocity, score and log-density are exact at every noise level (nothing to train: a network
fitted to a constant would only approximate this). Served like any analytic expert::

    # background.yaml
    expert: blank_canvas
    params: {height: 20, width: 52, std: 0.1}
    latent_space: pixels-1

    poegen serve analytic --config background.yaml --port 0

Its latent space is ``pixels-1``, the digit priors' own, so pixel-input rewards read the
canvas as it is.
"""

from __future__ import annotations

import dataclasses

import torch

from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel.experts import ExpertInfo

BLACK = -1.0


class BlankCanvas(GaussianMixture):
    """x0 ~ N(−1, std²) independently per pixel of a ``(1, height, width)`` canvas."""

    def __init__(
        self, height: int, width: int, std: float = 0.1, *, name: str = "background",
        max_batch: int | None = None,
    ) -> None:  # fmt: skip
        if height <= 0 or width <= 0:
            raise ValueError(f"height, width: must be positive, got {height}×{width}")
        if not 0 < std < 1:
            raise ValueError(f"std: must lie in (0, 1), got {std}")
        d = height * width
        super().__init__(
            torch.full((1, d), BLACK, dtype=torch.float64),
            torch.full((1, d), float(std) ** 2, dtype=torch.float64),
            [1.0],
            name=name,
            sample_shape=(1, height, width),
            max_batch=max_batch,
        )

    def describe(self) -> ExpertInfo:
        return dataclasses.replace(super().describe(), latent_space="pixels-1")
