"""Experts that see a window of the sample: a factor's ``crop``.

A factor with ``crop = [(a_1, b_1), …]`` ([start, stop) per trailing sample dimension) sees
only x_W = x[..., a_1:b_1, …] of each sample x: a 16×16 digit prior placed at a box of a
16×48 canvas, a regional model at its own resolution. Its factor of the product is
p_i(x_W)^{w_i} (product semantics, so its score is zero outside W), and in the kernel's
combination rules its mask m_i is the window's indicator (times the factor's region, when it
has one). A discriminative or constraint expert with a crop scores x̂_0's window:
r_j(x̂_0[W]), log C(x̂_0[W]); its proposals and projections change only the window.

:class:`CroppedExpert` does this around any expert: what it sends is the window (so a remote
expert receives, and is charged for, the window only), what it returns is padded back to the
sample with zeros (velocities, scores) or written into a copy of the input (proposals,
projections); per-sample outputs (log-densities, log-potentials) pass unchanged. It answers
``schedule`` for the window's shape and drops ``AUTOENCODER``: a window's decoder cannot
decode whole samples (pixel-input experts with a crop read pixel-space samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from poegen.kernel.experts import Capability, ExpertInfo, KernelError

Window = tuple[tuple[int, int], ...]


def check_window(crop: Sequence[Sequence[int]], shape: tuple[int, ...], field: str) -> Window:
    """The crop as ((start, stop), …) for the trailing dims of ``shape``; ``KernelError``
    naming ``field`` when a pair is not 0 ≤ start < stop ≤ size."""
    window = tuple((int(a), int(b)) for a, b in crop)
    if not window or len(window) > len(shape):
        raise KernelError(field, f"needs 1 to {len(shape)} [start, stop) pairs, got {len(window)}")
    for (start, stop), size in zip(window, shape[len(shape) - len(window) :], strict=True):
        if not 0 <= start < stop <= size:
            raise KernelError(field, f"[{start}, {stop}) does not fit a dimension of size {size}")
    return window


def window_shape(window: Window, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one sample's window."""
    lead = shape[: len(shape) - len(window)]
    return (*lead, *(stop - start for start, stop in window))


def window_mask(window: Window, shape: tuple[int, ...], **like: Any) -> Tensor:
    """1 inside the window, 0 elsewhere, shape ``shape``."""
    mask = torch.zeros(shape, **like)
    mask[_index(window, len(shape))] = 1
    return mask


def _index(window: Window, ndim: int) -> tuple[slice, ...]:
    """Index of the window in a tensor of ``ndim`` dims (a batch dim in front is allowed:
    leading dims are kept whole)."""
    return (..., *(slice(start, stop) for start, stop in window))


class CroppedExpert:
    """``expert`` seeing the ``window`` of samples of shape ``sample_shape``."""

    def __init__(self, expert: Any, window: Window, sample_shape: tuple[int, ...]) -> None:
        self.expert = expert
        self.window = window
        self.sample_shape = sample_shape
        self._at = _index(window, len(sample_shape) + 1)
        if hasattr(expert, "concurrent_chunks"):  # replicas: chunks in flight at once
            self.concurrent_chunks = expert.concurrent_chunks
        info = expert.describe()
        self._info = dataclasses.replace(
            info, capabilities=info.capabilities - {Capability.AUTOENCODER}
        )

    def describe(self) -> ExpertInfo:
        return self._info

    def _crop(self, x: Tensor) -> Tensor:
        return x[self._at].contiguous()

    def _pad(self, x: Tensor, window_out: Tensor) -> Tensor:
        """window_out written into zeros shaped like x."""
        out = torch.zeros_like(x, dtype=window_out.dtype)
        out[self._at] = window_out
        return out

    def _replace(self, x: Tensor, window_out: Tensor) -> Tensor:
        """x with its window replaced by window_out."""
        out = x.clone()
        out[self._at] = window_out
        return out

    # generative: zero outside the window (the mask is zero there too)
    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._pad(x, self.expert.velocity(self._crop(x), sigma))

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._pad(x, self.expert.score(self._crop(x), sigma))

    def velocity_vjp(self, x: Tensor, sigma: Tensor, cotangent: Tensor) -> Tensor:
        # the padded velocity is zero outside the window: only the window's cotangent counts
        vjp = self.expert.velocity_vjp(self._crop(x), sigma, self._crop(cotangent))
        return self._pad(x, vjp)

    def log_prob(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.expert.log_prob(self._crop(x), sigma)

    def schedule(self, num_steps: int, sample_shape: tuple[int, ...]) -> list[float]:
        return self.expert.schedule(num_steps, window_shape(self.window, self.sample_shape))

    # discriminative and constraint: the window of x̂_0 (or of its pixels)
    def log_potential(self, x0: Tensor) -> Tensor:
        return self.expert.log_potential(self._crop(x0))

    def propose(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return self._replace(x, self.expert.propose(self._crop(x), sigma, **kwargs))

    def project(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._replace(x, self.expert.project(self._crop(x), sigma))

    def close(self) -> None:
        close = getattr(self.expert, "close", None)
        if callable(close):
            close()
