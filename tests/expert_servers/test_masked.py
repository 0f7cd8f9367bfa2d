"""The masked-target constraint expert: exact replacement draws, the shell projection, the
Gaussian log-potential and its noised score, the registry, and the sampler (in process and
over gRPC) keeping the masked region on the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.remote import LoopThread
from scipy import stats

from poegen.expert_servers.analytic import GaussianMixture
from poegen.expert_servers.masked import MaskedTarget, noised_target
from poegen.expert_servers.server import Condition
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, ExpertKind, check_expert, create_expert
from poegen.kernel.remote import RemoteExpert
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2

TARGET = torch.tensor([[3.0, -3.0, 2.0], [0.5, 0.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
F64 = torch.float64


def _sigma(b: int, s: float) -> torch.Tensor:
    return torch.full((b,), s)


def test_propose_draws_the_noised_target_inside_and_keeps_the_rest() -> None:
    expert = MaskedTarget(TARGET, MASK)
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    out = expert.propose(x, _sigma(5, 0.3), seed=11)
    eps = torch.randn((5, 2, 3), generator=torch.Generator().manual_seed(11))
    assert torch.equal(out[:, 1], x[:, 1])
    torch.testing.assert_close(out[:, 0], 0.7 * TARGET[0] + 0.3 * eps[:, 0])
    assert torch.equal(out, expert.propose(x, _sigma(5, 0.3), seed=11))
    assert not torch.equal(out, expert.propose(x, _sigma(5, 0.3), seed=12))


def test_propose_moments_follow_the_forward_path() -> None:
    sigma = torch.tensor([0.2, 0.6, 0.9]).repeat_interleave(4000)
    drawn = noised_target(TARGET, sigma, len(sigma), seed=3, dtype=torch.float64, device="cpu")
    for k, s in enumerate((0.2, 0.6, 0.9)):
        block = drawn[k * 4000 : (k + 1) * 4000]
        se = s / 4000**0.5
        assert (block.mean(0) - (1 - s) * TARGET).abs().max() < 5 * se
        assert (block.std(0) - s).abs().max() < 0.05 * s


def test_soft_mask_blends_and_broadcasts() -> None:
    expert = MaskedTarget(TARGET, torch.tensor([0.25, 1.0, 0.0]))  # broadcast over rows
    x = torch.zeros(1, 2, 3)
    out = expert.propose(x, _sigma(1, 1e-6), seed=0)
    torch.testing.assert_close(out[0, :, 0], 0.25 * TARGET[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :, 1], TARGET[:, 1], atol=1e-5, rtol=0)
    assert torch.equal(out[0, :, 2], x[0, :, 2])


def test_projection_is_idempotent_and_lands_on_the_typical_shell() -> None:
    expert = MaskedTarget(TARGET, MASK, project=True)
    assert expert.describe().capabilities == {Capability.PROPOSE, Capability.PROJECT}
    x = 4 * torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.linspace(0.1, 0.9, 6)
    once = expert.project(x, sigma)
    torch.testing.assert_close(expert.project(once, sigma), once)
    assert torch.equal(once[:, 1], x[:, 1])
    eps = (once[:, 0] - (1 - sigma[:, None]) * TARGET[0]) / sigma[:, None]
    torch.testing.assert_close(eps.square().sum(1), torch.full((6,), 3.0))
    # the particle's own noise direction is kept
    own = x[:, 0] - (1 - sigma[:, None]) * TARGET[0]
    cos = torch.nn.functional.cosine_similarity(eps, own, dim=1)
    torch.testing.assert_close(cos, torch.ones(6))


def test_log_potential_and_its_gradient() -> None:
    mask = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    expert = MaskedTarget(TARGET, mask, weight=2.5)
    x0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    phi = expert.log_potential(x0)
    want = -1.25 * ((mask * (x0 - TARGET)) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(phi, want)
    assert (phi <= 0).all()
    (grad,) = torch.autograd.grad(phi.sum(), x0)
    torch.testing.assert_close(grad, -2.5 * mask**2 * (x0 - TARGET))
    assert float(expert.log_potential(TARGET[None])) == 0.0


def test_proposals_follow_the_noised_replacement_law() -> None:
    """x' = (1 − m)⊙x + m⊙((1 − σ)·x_ref + σ·ε): given x, each coordinate is
    N((1 − m)x + m(1 − σ)x_ref, (mσ)²), independently; where m = 0 it is x itself. Checked with
    scipy's KS test per level and coordinate, and the coordinates' correlations."""
    mask = torch.tensor([[1.0, 0.5, 1.0], [0.0, 0.25, 0.0]])
    expert = MaskedTarget(TARGET, mask)
    n, levels = 3000, (0.2, 0.6, 0.9)
    sigma = torch.tensor(levels, dtype=torch.float64).repeat_interleave(n)
    x = 2 * torch.randn(len(sigma), 2, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = expert.propose(x, sigma, seed=21).numpy()
    xs, m, ref, s = x.numpy(), mask.double().numpy(), TARGET.double().numpy(), sigma.numpy()
    s = s[:, None, None]
    loc, scale = (1 - m) * xs + m * (1 - s) * ref, m * s
    free = m == 0
    assert np.array_equal(out[:, free], xs[:, free])
    z = (out - loc)[:, ~free] / scale[:, ~free]  # standard normal where the mask is on
    for k in range(len(levels)):
        block = z[k * n : (k + 1) * n]
        for j in range(block.shape[1]):
            assert stats.kstest(block[:, j], stats.norm.cdf).pvalue > 1e-3, (levels[k], j)
        corr = np.corrcoef(block, rowvar=False)
        assert np.abs(corr - np.eye(len(corr))).max() < 5 / n**0.5
    # one draw per call: fresh seeds give independent draws of the same law
    one = np.stack([expert.propose(x[:1], sigma[:1], seed=k).numpy()[0] for k in range(2000)])
    z1 = (one - loc[0])[:, ~free] / scale[0][~free]
    for j in range(z1.shape[1]):
        assert stats.kstest(z1[:, j], stats.norm.cdf).pvalue > 1e-3, j


def test_noised_score_is_the_gradient_of_the_noised_tie_and_matches_its_law() -> None:
    expert = MaskedTarget(TARGET, MASK, weight=4.0)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    (grad,) = torch.autograd.grad(expert.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(expert.score(x, sigma), grad)
    # the law it claims: x0 ~ N(x_ref, I/w) on the mask, pushed to level σ, i.e.
    # N((1 − σ)x_ref, (1 − σ)²/w + σ²) per masked coordinate; scipy's density of it, written
    # from those parameters, equals log_prob up to a σ-only constant; the free row never counts
    rng = np.random.default_rng(5)
    for s in (0.1, 0.4, 0.95):
        pts = rng.normal(0.0, 3.0, size=(64, 2, 3))
        loc, sd = (1 - s) * TARGET[0].double().numpy(), ((1 - s) ** 2 / 4 + s**2) ** 0.5
        want = stats.norm.logpdf(pts[:, 0], loc=loc, scale=sd).sum(1)
        got = expert.log_prob(torch.from_numpy(pts), torch.full((64,), s, dtype=F64)).numpy()
        assert np.ptp(got - want) < 1e-9, s
    # and the score is that law's: Stein's identity on draws of it made with numpy (not with
    # the formula), E[s(x)] = 0 and E[s(x)ᵢ (xᵢ − μᵢ)] = −1 per masked coordinate
    n, s = 20000, 0.4
    x0 = TARGET.double().numpy() + rng.normal(size=(n, 2, 3)) / 2.0  # x_ref + N(0, I/w), w = 4
    xs = (1 - s) * x0 + s * rng.normal(size=(n, 2, 3))
    score = expert.score(torch.from_numpy(xs), torch.full((n,), s, dtype=F64)).numpy()
    assert np.array_equal(score[:, 1], np.zeros((n, 3)))
    inside, centred = score[:, 0], xs[:, 0] - (1 - s) * TARGET[0].double().numpy()
    se = inside.std(0) / n**0.5
    assert (np.abs(inside.mean(0)) < 5 * se).all()
    stein = inside * centred
    assert (np.abs(stein.mean(0) + 1) < 5 * stein.std(0) / n**0.5).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(target=[[1.0, float("nan")]]), "target"),
        (dict(target=[[1.0, 2.0]], mask=[2.0, 0.0]), "mask"),
        (dict(target=[[1.0, 2.0]], mask=[1.0, 0.0, 1.0]), "mask"),
        (dict(target=[[1.0, 2.0]], weight=0.0), "weight"),
        (dict(target=3.0), "target"),
    ],
)
def test_bad_parameters_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        MaskedTarget(**kwargs)


def test_registered_for_expert_files() -> None:
    expert = create_expert("masked_target", target=[[1.0, 2.0]], mask=[1.0, 0.0], weight=3.0)
    info = check_expert(expert)
    assert info.kind == ExpertKind.CONSTRAINT and info.sample_shape == (1, 2)


def test_prepare_takes_a_target_per_job_and_names_bad_fields() -> None:
    expert = MaskedTarget(torch.zeros(2, 3), MASK)
    view = expert.prepare(Condition(tensors={"target": TARGET}, scalars={"weight": 2.0}))
    assert torch.equal(view.target, TARGET) and view.weight == 2.0
    assert expert.prepare(Condition()) is expert
    for condition, field in [
        (Condition(tensors={"target": torch.zeros(3)}), "condition.tensors[target]"),
        (Condition(tensors={"target": TARGET}, scalars={"weight": -1.0}),
         "condition.scalars[weight]"),
        (Condition(tensors={"depth": TARGET}), "condition.depth"),
        (Condition(scalars={"weight": 1.0}), "condition.tensors[target]"),
    ]:  # fmt: skip
        with pytest.raises(ExpertError) as err:
            expert.prepare(condition)
        assert err.value.field == field


# ------------------------------------------------------------------ with the sampler


def _prior() -> GaussianMixture:
    return GaussianMixture([[0.0] * 6], [[1.0] * 6], [1.0], sample_shape=(2, 3), name="prior")


SETTINGS = SamplerSettings(num_particles=32, num_steps=20, mcmc_steps=2)


def _masked_error(result_particles: torch.Tensor) -> float:
    return float((result_particles[:, 0] - TARGET[0]).abs().max())


def test_sampler_keeps_the_masked_region_on_the_target() -> None:
    factors = [Factor(_prior()), Factor(MaskedTarget(TARGET, MASK, weight=50.0))]
    result = sample(factors, (2, 3), SETTINGS, generator=torch.Generator().manual_seed(0))
    free = sample([Factor(_prior())], (2, 3), SETTINGS, generator=torch.Generator().manual_seed(0))
    assert _masked_error(result.particles) < 0.3
    assert _masked_error(free.particles) > 2.0
    # the unmasked row keeps the prior's spread
    assert 0.5 < float(result.particles[:, 1].std()) < 1.6


def test_over_grpc_a_prepared_target_gives_the_in_process_samples(loop: LoopThread) -> None:
    served = loop.serve(MaskedTarget(torch.zeros(2, 3), MASK, weight=50.0))
    condition = expert_pb2.Condition(tensors={"target": codec.encode(TARGET)})
    with RemoteExpert.connect(served.address, condition=condition) as remote:
        remote_run = sample([Factor(_prior()), Factor(remote)], (2, 3), SETTINGS,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    local = sample([Factor(_prior()), Factor(MaskedTarget(TARGET, MASK, weight=50.0))], (2, 3),
                   SETTINGS, generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(remote_run.particles, local.particles)
    assert _masked_error(remote_run.particles) < 0.3


def test_built_from_an_expert_yaml_file(tmp_path) -> None:
    from poegen.expert_servers.server import load_expert_file

    path = tmp_path / "tie.yaml"
    path.write_text(
        "expert: masked_target\n"
        "params: {target: [[3.0, -3.0, 2.0], [0.5, 0.0, -1.0]], mask: [[1, 1, 1], [0, 0, 0]],"
        " weight: 2.0, project: true}\n"
    )
    served = load_expert_file(path)
    expert = served.expert
    assert isinstance(expert, MaskedTarget)
    assert torch.equal(expert.target, TARGET) and torch.equal(expert.mask, MASK)
    assert expert.describe().capabilities == {Capability.PROPOSE, Capability.PROJECT}
