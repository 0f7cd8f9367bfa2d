"""Log-space particle weights, effective sample size and resampling.

Weights are always carried as log-weights ``log_w`` of shape ``(N,)``; NaN counts as −inf (a
dead particle). Normalised log-weights satisfy ``logsumexp(log_w) = 0``.

Resamplers share one contract, ``scheme(log_w, n, *, generator) -> ancestors``: ``n``
ancestor indices (int64, sorted) whose offspring counts have expectation ``n·W_i``.

* ``systematic`` (default): one uniform shared by all draws; lowest variance for its cost,
  counts within one of n·W_i.
* ``stratified``: one uniform per stratum; counts within one of n·W_i per stratum.
* ``residual``: ⌊n·W_i⌋ copies, the remainder multinomial on the residuals.
* ``multinomial``: i.i.d. draws; the highest variance, the simplest to reason about.
* ``ssp``: the Srinivasan sampling process (Gerber, Chopin & Whiteley 2019): counts are
  ⌊n·W_i⌋ or ⌈n·W_i⌉, chosen by pairing fractional parts; sequential in N.

References: Douc, Cappé & Moulines (2005) "Comparison of resampling schemes"; Chopin &
Papaspiliopoulos (2020) "An Introduction to Sequential Monte Carlo", ch. 9.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from poegen.kernel.experts import KernelError

Resampler = Callable[..., Tensor]


def sanitize(log_w: Tensor) -> Tensor:
    """NaN → −inf, so that a broken particle counts as dead."""
    return torch.nan_to_num(log_w, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)


def normalize(log_w: Tensor) -> Tensor:
    """log W_i = log w_i − logsumexp(log w); all −inf stays all −inf."""
    log_w = sanitize(log_w)
    total = torch.logsumexp(log_w, 0)
    if torch.isneginf(total):
        return log_w
    return log_w - total


def ess_fraction(log_w: Tensor) -> float:
    """ESS/N = (Σw)² / (N·Σw²), computed in log space; 0 when every particle is dead."""
    log_w = sanitize(log_w).to(torch.float64)
    if torch.isneginf(log_w).all():
        return 0.0
    log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)
    return float(torch.exp(log_ess) / log_w.numel())


def log_mean_weight(log_w: Tensor, log_increment: Tensor) -> Tensor:
    """log Σ_i W_i·G_i: one level's factor of the evidence, W normalised."""
    return torch.logsumexp(normalize(log_w) + sanitize(log_increment), 0)


def log_increment(new: Tensor, old: Tensor) -> Tensor:
    """new − old, −inf where the particle was already dead (old = −inf)."""
    return torch.where(torch.isneginf(old), torch.full_like(new, -torch.inf), new - old)


def _weights(log_w: Tensor) -> Tensor:
    log_w = sanitize(log_w)
    if torch.isneginf(log_w).all():
        raise KernelError("log_w", "every particle has zero weight; nothing to resample")
    return torch.softmax(log_w.to(torch.float64), 0)


def _inverse_cdf(w: Tensor, u: Tensor) -> Tensor:
    """Indices i with cumsum(w)[i−1] ≤ u < cumsum(w)[i], for sorted u in [0, 1)."""
    # a cumsum can end just below 1.0: clamp, never index past the end
    return torch.searchsorted(torch.cumsum(w, 0), u, right=True).clamp_(max=w.numel() - 1)


def systematic(log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """n ancestors from one shared uniform: u_i = (i + U)/n."""
    w = _weights(log_w)
    u = (torch.arange(n, dtype=w.dtype) + torch.rand((), generator=generator, dtype=w.dtype)) / n
    return _inverse_cdf(w, u)


def stratified(log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """n ancestors from one uniform per stratum: u_i = (i + U_i)/n."""
    w = _weights(log_w)
    u = (torch.arange(n, dtype=w.dtype) + torch.rand(n, generator=generator, dtype=w.dtype)) / n
    return _inverse_cdf(w, u)


def multinomial(log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """n i.i.d. ancestors: sorted uniforms through the inverse CDF."""
    w = _weights(log_w)
    u, _ = torch.sort(torch.rand(n, generator=generator, dtype=w.dtype))
    return _inverse_cdf(w, u)


def residual(log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """⌊n·W_i⌋ deterministic copies, then multinomial on the residual weights."""
    w = _weights(log_w)
    copies = torch.floor(n * w).to(torch.int64)
    rest = n - int(copies.sum())
    if rest > 0:
        residual_w = n * w - copies
        extra = multinomial(torch.log(residual_w), rest, generator=generator)
        copies += torch.bincount(extra, minlength=w.numel())
    return _from_counts(copies)


def ssp(log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """Srinivasan sampling process: each count is ⌊n·W_i⌋ or ⌈n·W_i⌉, E[count] = n·W_i.

    Fractional parts are paired off: the pair (a, b) with fractions (f_a, f_b) moves mass so
    that one of them ends at 0 or 1, with probabilities that keep both expectations, and the
    other carries on to meet the next index.
    """
    w = _weights(log_w)
    copies = torch.floor(n * w).to(torch.int64)
    frac = (n * w - copies).tolist()
    u = torch.rand(max(w.numel() - 1, 0), generator=generator, dtype=torch.float64).tolist()
    counts = copies.tolist()
    carry = 0  # index whose fraction is still open
    for step, b in enumerate(range(1, w.numel())):
        fa, fb = frac[carry], frac[b]
        total = fa + fb
        if total < 1:  # one of the two absorbs the other's fraction
            keep_a = total > 0 and u[step] < fa / total
            frac[carry], frac[b] = (total, 0.0) if keep_a else (0.0, total)
            carry = carry if keep_a else b
        else:  # one of the two gets a whole extra copy, the other keeps total − 1
            a_gets_one = u[step] < (1 - fb) / (2 - total)
            winner, loser = (carry, b) if a_gets_one else (b, carry)
            counts[winner] += 1
            frac[winner], frac[loser] = 0.0, total - 1
            carry = loser
    missing = n - sum(counts)
    if missing > 0:  # round-off left the last open fraction at ≈ 1
        counts[carry] += missing
    return _from_counts(torch.tensor(counts, dtype=torch.int64))


def _from_counts(counts: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
    "multinomial": multinomial,
    "ssp": ssp,
}


def resample(scheme: str, log_w: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """Ancestor indices by scheme name; unknown names raise ``ValueError``."""
    if scheme not in RESAMPLERS:
        raise KernelError(
            "resampling", f"unknown scheme {scheme!r} (known: {', '.join(RESAMPLERS)})"
        )
    return RESAMPLERS[scheme](log_w, n, generator=generator)
