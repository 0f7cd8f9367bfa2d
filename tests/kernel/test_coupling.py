"""Conditional experts (``Factor.parents``): the pull toward a parent's velocity, in process and
over the wire.

The pull of a child i toward a parent p adds ∇E to v_i, E = w·Σ o·(v_i(x) − sg v_p(x))², so the
reference is the Jacobian of the analytic experts' closed-form velocities (``torch.func``,
independent of the VJP path under test) and, for a single Gaussian, its closed form."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers.remote import LoopThread

from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel import codec
from poegen.kernel.calls import ExpertCalls
from poegen.kernel.coupling import coupled_velocities
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind, KernelError
from poegen.kernel.problem import build_problem
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

SETTINGS = SamplerSettings(num_particles=256, num_steps=12, mcmc_steps=1)


def two_modes(name: str, shift: float, d: int = 3) -> GaussianMixture:
    """Two anisotropic components: a velocity whose Jacobian varies with x."""
    means = torch.tensor([[shift, 0.0, 1.0], [-1.0, shift, 0.5]])[:, :d]
    covariances = torch.tensor([[0.3, 0.8, 0.2], [0.6, 0.1, 0.4]])[:, :d]
    return GaussianMixture(means, covariances, [0.3, 0.7], name=name)


def gaussian(name: str, mean: list[float], var: float) -> GaussianMixture:
    return GaussianMixture([mean], [[var] * len(mean)], [1.0], name=name)


def evaluated(factors: list[Factor], batch_shape: tuple[int, int], level: float, seed: int):
    """x, σ, the plain and the coupled velocities of ``factors`` at a random float64 batch, and
    the calls' stats."""
    problem = build_problem(factors, batch_shape[1:], SETTINGS, torch.float64, "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_shape, generator=g, dtype=torch.float64)
    sigma = torch.full(batch_shape[:1], level, dtype=torch.float64)
    plain = [b.factor.expert.velocity(x, sigma) for b in problem.generative]
    with ExpertCalls(problem.generative, None) as calls:
        coupled = coupled_velocities(problem.couplings, problem.generative, calls, x, sigma, plain)
        return x, sigma, plain, coupled, calls.take_stats()


def test_the_vjp_of_a_gaussian_is_its_closed_form_jacobian() -> None:
    """N(μ, λI): v = g·(x − (1−σ)μ) − μ with g = (σ − (1−σ)λ)/((1−σ)²λ + σ²), so Jᵀc = g·c."""
    expert = gaussian("g", [0.5, -1.0], 0.3)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    c = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gain = (sigma - (1 - sigma) * 0.3) / ((1 - sigma) ** 2 * 0.3 + sigma**2)
    torch.testing.assert_close(expert.velocity_vjp(x, sigma, c), gain[:, None] * c)


def test_the_coupled_velocity_adds_the_gradient_of_the_disagreement() -> None:
    """ṽ_child = v_child + Σ_p ∇_x w_p·Σ o_p·(v_child(x) − sg v_p(x))², with two parents, a region
    on one and a weight on the child (weights do not enter the overlap)."""
    child, first, second = (
        two_modes("child", 1.0),
        two_modes("a", -0.5),
        gaussian("b", [0, 1, 0], 2),
    )
    region = torch.tensor([1.0, 0.5, 0.0])
    factors = [
        Factor(child, weight=2.0, parents={"a": 0.7, "b": 0.2}),
        Factor(first, region=region),
        Factor(second),
    ]
    x, sigma, plain, coupled, stats = evaluated(factors, (4, 3), 0.6, seed=2)

    def disagreement(y: torch.Tensor) -> torch.Tensor:
        v = child.velocity(y[None], sigma[:1])[0]
        return (0.7 * region * (v - target_a) ** 2).sum() + (0.2 * (v - target_b) ** 2).sum()

    for row in range(4):
        target_a, target_b = plain[1][row], plain[2][row]
        pull = torch.func.grad(disagreement)(x[row])
        torch.testing.assert_close(coupled[0][row], plain[0][row] + pull)
    assert torch.equal(coupled[1], plain[1]) and torch.equal(coupled[2], plain[2])
    assert stats["child"].vjp_samples == 4 and stats["a"].vjp_samples == 0


class CoupledByHand:
    """The child's coupled field ṽ = v_c + ∇_x w·‖v_c(x) − sg v_p(x)‖² as a plain expert, the
    gradient by ``torch.func`` (of the batch's sum: rows do not interact): what a coupled run
    must sample."""

    def __init__(self, child: GaussianMixture, parent: GaussianMixture, pull: float) -> None:
        self.child, self.parent, self.pull = child, parent, pull

    def describe(self) -> ExpertInfo:
        return ExpertInfo("by_hand", ExpertKind.GENERATIVE)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        target = self.parent.velocity(x, sigma)

        def disagreement(y: torch.Tensor) -> torch.Tensor:
            return self.pull * ((self.child.velocity(y, sigma) - target) ** 2).sum()

        return self.child.velocity(x, sigma) + torch.func.grad(disagreement)(x)


@pytest.mark.parametrize("transition", ["euler", "fk"])
def test_a_coupled_run_samples_the_coupled_field(transition: str) -> None:
    """The coupled velocity replaces the child's everywhere (transport, the moves' score, the FK
    rate): the run equals one whose child is the coupled field written by hand; and it is not
    the uncoupled run. The trace counts one VJP sample per velocity sample of the child."""
    child, parent = two_modes("child", 1.0), two_modes("parent", -0.5)
    settings = SamplerSettings(num_particles=128, num_steps=8, mcmc_steps=2, transition=transition)

    def run(factors: list[Factor]):
        return sample(
            factors, (3,), settings, generator=torch.Generator().manual_seed(0),
            dtype=torch.float64,
        )  # fmt: skip

    coupled = run([Factor(child, parents={"parent": 0.6}), Factor(parent)])
    by_hand = run([Factor(CoupledByHand(child, parent, 0.6)), Factor(parent)])
    plain = run([Factor(child), Factor(parent)])
    torch.testing.assert_close(coupled.particles, by_hand.particles, rtol=1e-9, atol=1e-9)
    assert (coupled.particles - plain.particles).abs().max() > 0.1
    for level in coupled.trace:
        stats = level.experts
        assert stats["child"].vjp_samples == stats["parent"].samples > 0
        assert stats["child"].samples == 2 * stats["parent"].samples
        assert stats["parent"].vjp_samples == 0


def test_between_equal_width_gaussians_the_pull_is_a_drift_set_by_the_grid() -> None:
    """N(1, 0.3) × N(−1, 0.3): v_child − v_parent is constant in x, so the pull J_childᵀc is a
    drift whose sign follows the child's Jacobian g(σ) = (σ − 0.3(1−σ))/c, positive early and
    negative late; where the product's mean (0 without the pull) ends depends on the grid."""
    child, parent = gaussian("child", [1.0], 0.3), gaussian("parent", [-1.0], 0.3)
    means = {}
    for levels, moves in ((12, 1), (30, 2)):
        settings = SamplerSettings(num_particles=2000, num_steps=levels, mcmc_steps=moves)
        for pull in (None, 0.5):
            factors = [Factor(child, parents={"parent": pull} if pull else {}), Factor(parent)]
            result = sample(factors, (1,), settings, generator=torch.Generator().manual_seed(0))
            means[levels, pull] = float(result.particles.mean())
    assert abs(means[12, None]) < 0.05 and abs(means[30, None]) < 0.05
    assert means[12, 0.5] > 0.2 and means[30, 0.5] < -0.1


def test_a_cropped_conditional_expert_pulls_inside_its_window_only() -> None:
    """The child sees columns 1–2 of 4 (its crop); the pull is zero elsewhere, and inside it is
    the whole-sample formula for the window."""
    child = gaussian("child", [0.5, 0.5], 0.4)
    parent = gaussian("parent", [-1.0, 0.0, 2.0, 1.0], 1.0)
    factors = [Factor(child, crop=((1, 3),), parents={"parent": 1.5}), Factor(parent)]
    _, _, plain, coupled, _ = evaluated(factors, (3, 4), 0.4, seed=3)
    gain = (0.4 - 0.6 * 0.4) / (0.6**2 * 0.4 + 0.4**2)  # the child's Jacobian, g·I
    expected = plain[0].clone()
    expected[:, 1:3] += gain * 2 * 1.5 * (plain[0][:, 1:3] - plain[1][:, 1:3])
    torch.testing.assert_close(coupled[0], expected)
    assert torch.equal(coupled[0][:, [0, 3]], torch.zeros(3, 2, dtype=torch.float64))


class NoVjp:
    """A generative expert without the VJP capability."""

    def __init__(self) -> None:
        self.inner = gaussian("plain", [0.0, 0.0], 1.0)

    def describe(self) -> ExpertInfo:
        return ExpertInfo("plain", ExpertKind.GENERATIVE, frozenset({Capability.LOG_PROB}))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.inner.velocity(x, sigma)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.inner.log_prob(x, sigma)


@pytest.mark.parametrize(
    ("factors", "settings", "field", "words"),
    [
        (lambda a, b: [Factor(a, parents={"nobody": 1.0}), Factor(b)], SETTINGS,
         "factors[0].parents[nobody]", "no generative factor named 'nobody'"),
        (lambda a, b: [Factor(a, parents={"a": 1.0}), Factor(b)], SETTINGS,
         "factors[0].parents[a]", "its own parent"),
        (lambda a, b: [Factor(NoVjp(), parents={"b": 1.0}), Factor(b)], SETTINGS,
         "factors[0].parents", "needs velocity_vjp"),
        (lambda a, b: [Factor(a, parents={"b": 1.0}), Factor(b)],
         SamplerSettings(num_steps=4, mcmc="mala"), "mcmc", "log-densities"),
        (lambda a, b: [Factor(a, region=torch.tensor([1.0, 0.0]), parents={"b": 1.0}),
                       Factor(b, region=torch.tensor([0.0, 1.0]))], SETTINGS,
         "factors[0].parents[b]", "share no coordinate"),
    ],
)  # fmt: skip
def test_a_coupling_the_kernel_cannot_run_is_refused_naming_the_field(
    factors, settings, field, words
) -> None:
    a, b = gaussian("a", [0.0, 0.0], 1.0), gaussian("b", [1.0, 1.0], 1.0)
    with pytest.raises(KernelError) as info:
        sample(factors(a, b), (2,), settings, generator=torch.Generator())
    assert info.value.field == field and words in info.value.reason


@pytest.mark.parametrize("pull", [0.0, -1.0, float("nan"), float("inf")])
def test_a_pull_weight_must_be_finite_and_positive(pull: float) -> None:
    with pytest.raises(KernelError) as info:
        Factor(gaussian("a", [0.0], 1.0), parents={"b": pull})
    assert info.value.field == "parents[b]"


def test_remote_experts_give_the_in_process_coupled_run_bit_for_bit(loop: LoopThread) -> None:
    """The child's VJP travels as VelocityVjp: a run through RemoteExpert equals the run on the
    in-process experts for the same seed."""
    child, parent = two_modes("child", 1.0), two_modes("parent", -0.5)
    settings = SamplerSettings(num_particles=64, num_steps=6, mcmc_steps=2)
    local = sample(
        [Factor(child, parents={"parent": 0.8}), Factor(parent)], (3,), settings,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    served = [loop.serve(child), loop.serve(parent)]
    with (
        RemoteExpert.connect(served[0].address) as remote_child,
        RemoteExpert.connect(served[1].address) as remote_parent,
    ):
        assert remote_child.describe().supports(Capability.VJP)
        remote = sample(
            [Factor(remote_child, parents={"parent": 0.8}), Factor(remote_parent)], (3,),
            settings, generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
    assert torch.equal(remote.particles, local.particles)
    assert torch.equal(remote.log_weights, local.log_weights)


def _request(addresses: list[str], parents: dict[str, float]) -> sampler_pb2.GenerateRequest:
    child = sampler_pb2.FactorSpec(address=addresses[0], name="child")
    child.parents.update(parents)
    factors = [child, sampler_pb2.FactorSpec(address=addresses[1], name="parent")]
    settings = sampler_pb2.SamplerSettings(num_particles=32, num_steps=4, mcmc_steps=1)
    return sampler_pb2.GenerateRequest(factors=factors, sample_shape=[3], settings=settings, seed=9)


def test_the_sampler_service_couples_by_the_request_and_counts_the_vjps(
    loop: LoopThread,
) -> None:
    child, parent = two_modes("child", 1.0), two_modes("parent", -0.5)
    served = [loop.serve(child), loop.serve(parent)]
    sampler = loop.sampler()
    settings = SamplerSettings(num_particles=32, num_steps=4, mcmc_steps=1)
    local = sample(
        [Factor(child, name="child", parents={"parent": 0.5}), Factor(parent, name="parent")],
        (3,), settings, generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    addresses = [s.address for s in served]
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        replies = list(stub.Generate(_request(addresses, {"parent": 0.5})))
        particles = codec.decode(replies[-1].result.particles, field="particles")
        assert torch.equal(particles, local.particles)
        timings = {t.name: t for t in replies[1].level.timings}
        assert timings["child"].vjp_samples == timings["parent"].samples > 0
        assert timings["parent"].vjp_samples == 0
        for parents, field in (
            ({"parent": -1.0}, "factors[0].parents[parent]"),
            ({"ghost": 1.0}, "factors[0].parents[ghost]"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(_request(addresses, parents)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            error = from_rpc_error(info.value)
            assert error is not None and error.field == field
        # the service still serves
        assert list(stub.Generate(_request(addresses, {})))[-1].HasField("result")
