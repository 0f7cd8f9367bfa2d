"""A factor's ``crop``: the expert sees a window of the sample, in process and over the wire.

Diagonal Gaussians make every claim exact: a diagonal Gaussian's velocity at a coordinate
depends on that coordinate only, so an expert on the window equals the same Gaussian over the
whole sample masked to the window, and the product law is known per coordinate."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers.remote import LoopThread

from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel import codec
from poegen.kernel.crop import CroppedExpert, window_mask
from poegen.kernel.errors import from_rpc_error
from poegen.kernel.experts import KernelError
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import sampler_pb2, sampler_pb2_grpc

SHAPE = (1, 2, 4)
WINDOW = ((0, 2), (1, 3))  # rows 0–1, columns 1–2: a 1×2×2 window
TINY = SamplerSettings(num_particles=4, num_steps=2)


def diagonal(mean: float, var: float, shape: tuple[int, ...], name: str) -> GaussianMixture:
    d = int(torch.tensor(shape).prod())
    return GaussianMixture(
        torch.full((1, d), mean), torch.full((1, d), var), [1.0], name=name, sample_shape=shape
    )


def test_the_window_is_what_the_expert_sees_and_outputs_are_padded() -> None:
    inner = diagonal(1.0, 0.5, (1, 2, 2), "inner")
    cropped = CroppedExpert(inner, WINDOW, SHAPE)
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 0.4)
    v = cropped.velocity(x, sigma)
    assert v.shape == x.shape
    assert torch.equal(v[..., 0:2, 1:3], inner.velocity(x[..., 0:2, 1:3].contiguous(), sigma))
    outside = 1 - window_mask(WINDOW, SHAPE)
    assert torch.equal(v * outside, torch.zeros_like(v))
    assert torch.equal(cropped.log_prob(x, sigma), inner.log_prob(x[..., 0:2, 1:3], sigma))


def test_a_cropped_factor_equals_the_whole_sample_expert_masked_to_its_window() -> None:
    settings = SamplerSettings(num_particles=64, num_steps=8, mcmc_steps=2, ess_threshold=0.5)
    base = diagonal(0.0, 1.0, SHAPE, "base")

    def run(second: Factor) -> torch.Tensor:
        factors = [Factor(base), second]
        return sample(factors, SHAPE, settings, generator=torch.Generator().manual_seed(3))

    cropped = run(Factor(diagonal(2.0, 0.25, (1, 2, 2), "patch"), crop=WINDOW))
    masked = run(Factor(diagonal(2.0, 0.25, SHAPE, "patch"), region=window_mask(WINDOW, SHAPE)))
    torch.testing.assert_close(cropped.particles, masked.particles, rtol=1e-5, atol=1e-5)


def test_the_product_with_a_cropped_factor_has_the_exact_law() -> None:
    """N(0, 1) everywhere × N(2, 1/4) on the window: inside, precision 1 + 4 = 5 and mean
    (0·1 + 2·4)/5 = 1.6; outside, N(0, 1). FK transition, 4096 particles."""
    settings = SamplerSettings(
        num_particles=4096, num_steps=40, mcmc_steps=2, transition="fk", ess_threshold=0.5
    )
    factors = [
        Factor(diagonal(0.0, 1.0, SHAPE, "base")),
        Factor(diagonal(2.0, 0.25, (1, 2, 2), "patch"), crop=WINDOW),
    ]
    result = sample(factors, SHAPE, settings, generator=torch.Generator().manual_seed(0))
    draws = result.draws(4096, generator=torch.Generator().manual_seed(1))
    inside = window_mask(WINDOW, SHAPE).bool()
    mean, var = draws.mean(0), draws.var(0)
    # s.e. of a mean of 4096 draws of variance ≤ 1 is ≤ 0.016 (resampling adds some)
    assert torch.allclose(mean[inside], torch.tensor(1.6), atol=0.08)
    assert torch.allclose(var[inside], torch.tensor(0.2), atol=0.04)
    assert torch.allclose(mean[~inside], torch.tensor(0.0), atol=0.08)
    assert torch.allclose(var[~inside], torch.tensor(1.0), atol=0.15)


def test_a_crop_that_does_not_fit_is_refused_naming_the_factor() -> None:
    factors = [
        Factor(diagonal(0.0, 1.0, SHAPE, "base")),
        Factor(diagonal(2.0, 0.25, (1, 2, 2), "patch"), crop=((0, 2), (3, 5))),
    ]
    with pytest.raises(KernelError) as info:
        sample(factors, SHAPE, TINY, generator=torch.Generator())
    assert info.value.field == "factors[1].crop"
    wrong_size = [factors[0], Factor(diagonal(2.0, 0.25, (1, 2, 2), "patch"), crop=((0, 1),))]
    with pytest.raises(KernelError) as info:
        sample(wrong_size, SHAPE, TINY, generator=torch.Generator())
    assert info.value.field == "sample_shape"


def _request(addresses: list[str], crop: list[tuple[int, int]]) -> sampler_pb2.GenerateRequest:
    factors = [sampler_pb2.FactorSpec(address=addresses[0])]
    patch = sampler_pb2.FactorSpec(address=addresses[1])
    for start, stop in crop:
        patch.crop.add(start=start, stop=stop)
    factors.append(patch)
    settings = sampler_pb2.SamplerSettings(num_particles=16, num_steps=4, mcmc_steps=1)
    return sampler_pb2.GenerateRequest(
        factors=factors, sample_shape=list(SHAPE), settings=settings, seed=5
    )


def test_the_sampler_service_sends_only_the_window(loop: LoopThread) -> None:
    """The served patch accepts only 1×2×2 samples: the job runs only if the service crops;
    and its result is the in-process one, bit for bit."""
    base, patch = diagonal(0.0, 1.0, SHAPE, "base"), diagonal(2.0, 0.25, (1, 2, 2), "patch")
    served = [loop.serve(base), loop.serve(patch)]
    sampler = loop.sampler()
    settings = SamplerSettings(num_particles=16, num_steps=4, mcmc_steps=1)
    local = sample(
        [Factor(base), Factor(patch, crop=WINDOW)], SHAPE, settings,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    with grpc.insecure_channel(sampler.address) as channel:
        stub = sampler_pb2_grpc.SamplerServiceStub(channel)
        replies = list(stub.Generate(_request([s.address for s in served], list(WINDOW))))
        result = replies[-1].result
        assert torch.equal(codec.decode(result.particles, field="particles"), local.particles)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(_request([s.address for s in served], [(0, 2), (3, 9)])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(info.value)
    assert error is not None and error.field == "factors[1].crop"
    assert all(len(s.host.handles) == 0 for s in served)
