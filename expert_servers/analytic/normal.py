"""The standard normal in one dimension, tail-safe: log-CDF, its inverse, truncated laws.

Everything works in log space so that masses like Φ(−40) ≈ 4·10⁻³⁵⁰ (below float64's range)
stay exact. Contract for the truncated normal on ``[a, b]`` (a ≤ b, either may be infinite):

    log_ndtr_diff(a, b)        = log(Φ(b) − Φ(a))
    truncnorm_moments(a, b)    = (E[z], Var[z]) for z ~ N(0, 1) restricted to [a, b]
    truncnorm_sample(a, b, u)  = Φ⁻¹(Φ(a) + u·(Φ(b) − Φ(a))), u ~ U(0, 1)

An interval in the upper half (a > 0) is mirrored to (−b, −a), where Φ is small and exact.
Variances of very narrow intervals (b − a ≲ 10⁻⁴) lose digits to cancellation: use float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_phi(z: Tensor) -> Tensor:
    """log φ(z) = −z²/2 − ½log 2π (−inf at ±inf)."""
    return -0.5 * z * z - LOG_SQRT_2PI


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_ndtri(log_p: Tensor) -> Tensor:
    """Φ⁻¹(exp(log p)), also where exp(log p) underflows or rounds to 1.

    For p > ½: −Φ⁻¹(1 − p) with 1 − p = −expm1(log p). For p between the smallest normal
    float and ½: ``ndtri(exp(log p))``. Below: start from the asymptote
    log Φ(z) ≈ −z²/2 − log(−z) − ½log 2π, i.e. z₀ = −√(t − log t − log 2π) with t = −2 log p,
    then Newton on log Φ(z) = log p (slope φ(z)/Φ(z)); four steps reach machine precision.
    """
    upper = -torch.special.ndtri(-torch.expm1(log_p))
    z = torch.where(log_p > -math.log(2), upper, torch.special.ndtri(log_p.exp()))
    deep = log_p < math.log(torch.finfo(log_p.dtype).tiny) + 1
    if deep.any():
        z = z.clone()
        z[deep] = _newton_log_ndtri(log_p[deep])
    return z


def _newton_log_ndtri(log_p: Tensor) -> Tensor:
    t = -2 * log_p
    z = -torch.sqrt(t - torch.log(t) - 2 * LOG_SQRT_2PI)
    for _ in range(4):
        log_cdf = torch.special.log_ndtr(z)
        z = z - (log_cdf - log_p) * torch.exp(log_cdf - log_phi(z))
    return z


def _mirror(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map [a, b] with a > 0 to [−b, −a]; returns (a', b', sign) with a' ≤ 0 where it matters."""
    upper = a > 0
    sign = torch.where(upper, -1.0, 1.0).to(a.dtype)
    return torch.where(upper, -b, a), torch.where(upper, -a, b), sign


def log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Φ(b) − Φ(a)) for a ≤ b = log Φ(b) + log(1 − Φ(a)/Φ(b)), mirrored when a > 0."""
    a, b, _ = _mirror(a, b)
    log_b = torch.special.log_ndtr(b)
    return log_b + log1mexp(torch.special.log_ndtr(a) - log_b)


def truncnorm_moments(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of N(0, 1) restricted to [a, b].

    With Z = Φ(b) − Φ(a):  E[z] = (φ(a) − φ(b))/Z,  Var[z] = 1 + (aφ(a) − bφ(b))/Z − E[z]².
    """
    a, b, sign = _mirror(a, b)
    log_z = log_ndtr_diff(a, b)
    pa = torch.exp(log_phi(a) - log_z)
    pb = torch.exp(log_phi(b) - log_z)
    mean = pa - pb
    # a·φ(a) → 0 at a = −inf (and b·φ(b) at b = inf): avoid −inf·0
    apa = torch.where(torch.isfinite(a), a * pa, torch.zeros_like(pa))
    bpb = torch.where(torch.isfinite(b), b * pb, torch.zeros_like(pb))
    var = (1 + apa - bpb - mean * mean).clamp_min(0)
    return sign * mean, var


def truncnorm_sample(a: Tensor, b: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of N(0, 1) restricted to [a, b] from uniforms ``u`` in (0, 1).

    log P = log(Φ(a) + u·Z) = logaddexp(log Φ(a), log u + log Z), z = Φ⁻¹(P) via ``log_ndtri``;
    the result is clamped to [a, b] against rounding.
    """
    a, b, sign = _mirror(a, b)
    log_p = torch.logaddexp(torch.special.log_ndtr(a), torch.log(u) + log_ndtr_diff(a, b))
    z = torch.minimum(torch.maximum(log_ndtri(log_p), a), b)
    return sign * z


def open_uniform(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """U(0, 1) draws, never exactly 0 (so log u and Φ⁻¹ stay finite)."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=generator.device)
    return u.clamp_min(torch.finfo(dtype).tiny)
