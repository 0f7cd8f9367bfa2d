"""Conditional experts: a generative factor's velocity pulled toward its parents' predictions
(the coupling of "Product of Experts for Visual Generation", Zhang et al. 2025).

A factor i with parents P(i), pull weights w_p > 0, is pulled down the disagreement

    E_i(x) = Σ_{p∈P(i)} w_p Σ_j o_p,j·(v_i(x) − sg v_p(x))_j²

with sg the stop-gradient (a parent is a fixed target) and o_p = m_i·m_p where both factors
speak (each factor's region times its crop's window, the weights left out). Particles move
along −v as σ falls (v ≈ ε − x_0, :mod:`poegen.kernel.path`), so the pull enters as

    ṽ_i(x) = v_i(x) + ∇E_i(x) = v_i(x) + J_i(x)ᵀ c_i,     c_i = 2 Σ_p w_p·o_p ⊙ (v_i(x) − v_p(x)),

J_i = ∂v_i/∂x the expert's Jacobian; in score terms it adds −((1−σ)/σ)·∇E_i to s_i. (The paper
writes v for the velocity toward the data, t: 0 → 1, where the same pull has a minus sign.)
One ``velocity_vjp`` call per conditional expert and evaluation gives J_iᵀ c_i. The parents'
velocities are those at the same x, uncoupled: a parent that is itself conditional is pulled
toward its own parents, but the child sees its plain prediction (one pass, no fixed point).

ṽ_i replaces v_i wherever the kernel reads a velocity: the averaged velocity of the transport,
the score −(x + (1−σ)·ṽ_i)/σ of the moves, and the FK rate. The pull is the paper's heuristic:
ṽ_i is in general not the velocity of any density, so a coupled run samples the product of the
coupled fields rather than Π p_i exactly; MALA and HMC, which need log-densities, refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from poegen.kernel.calls import BoundFactor, Call, ExpertCalls


@dataclass(frozen=True, slots=True)
class Coupling:
    """A conditional expert: generative factor ``child`` (index into ``Problem.generative``)
    pulled toward each of ``parents`` with its weight, over the overlaps of their supports."""

    child: int
    parents: tuple[int, ...]
    weights: tuple[float, ...]
    overlaps: tuple[Tensor, ...]  # o_p = m_child·m_p, shape S


def cotangent(coupling: Coupling, velocities: Sequence[Tensor]) -> Tensor:
    """c_i = 2 Σ_p w_p·o_p ⊙ (v_i − v_p): the gradient of E_i along v_i."""
    v = velocities[coupling.child]
    out = None
    for parent, weight, overlap in zip(
        coupling.parents, coupling.weights, coupling.overlaps, strict=True
    ):
        term = (2 * weight) * overlap * (v - velocities[parent])
        out = term if out is None else out + term
    assert out is not None
    return out


def coupled_velocities(
    couplings: Sequence[Coupling],
    generative: Sequence[BoundFactor],
    calls: ExpertCalls,
    x: Tensor,
    sigma: Tensor,
    velocities: Sequence[Tensor],
) -> list[Tensor]:
    """ṽ_i = v_i + J_iᵀ c_i for every conditional expert (their VJPs called concurrently); the
    other velocities unchanged."""
    out = list(velocities)
    if not couplings:
        return out
    jobs = [
        Call(generative[c.child], "velocity_vjp", x, (sigma, cotangent(c, velocities)))
        for c in couplings
    ]
    for coupling, pull in zip(couplings, calls.run(jobs), strict=True):
        out[coupling.child] = velocities[coupling.child] + pull
    return out
