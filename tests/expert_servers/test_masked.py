"""The masked-target constraint expert: exact replacement draws, the shell projection, the
Gaussian log-potential and its noised score, the registry, and the sampler (in process and
over gRPC) keeping the masked region on the target."""

from __future__ import annotations

import pytest
import torch
from helpers.remote import LoopThread

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


def test_noised_score_is_the_gradient_of_the_noised_tie_and_matches_its_law() -> None:
    expert = MaskedTarget(TARGET, MASK, weight=4.0)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    (grad,) = torch.autograd.grad(expert.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(expert.score(x, sigma), grad)
    # the law it claims: x0 ~ N(x_ref, I/w) pushed to level σ has variance (1−σ)²/w + σ²
    g = torch.Generator().manual_seed(5)
    n, s = 20000, 0.4
    x0 = TARGET + torch.randn(n, 2, 3, generator=g, dtype=torch.float64) / 2.0
    xs = (1 - s) * x0 + s * torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    assert abs(float(xs[:, 0].var(0).mean()) - ((1 - s) ** 2 / 4 + s**2)) < 0.01


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
