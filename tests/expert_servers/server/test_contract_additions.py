"""The contract's later RPCs over real hosts on 127.0.0.1: Schedule (an expert's own noise grid,
``SamplerSettings(schedule="expert")``), Render (named tensors of a prepared condition),
Encode/Decode through RemoteExpert, and ``pixel_input`` in Describe."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from helpers.remote import LoopThread
from torch import Tensor

from poegen.expert_servers.analytic import GaussianMixture
from poegen.expert_servers.server.adapter import Condition
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, ExpertInfo, ExpertKind
from poegen.kernel.refusal import Code
from poegen.kernel.remote import RemoteExpert, RemoteExpertError
from poegen.kernel.sampler import sample
from poegen.kernel.schedule import shifted_sigmas
from poegen.kernel.spec import Factor, SamplerSettings
from poegen.v1 import expert_pb2


class ScheduledMixture(GaussianMixture):
    """A mixture that answers its own grid (FLUX's shift, s depending on the sample size) and
    has a fixed linear autoencoder (latents = pixels / 2)."""

    def describe(self) -> ExpertInfo:
        info = super().describe()
        extra = {Capability.SCHEDULE, Capability.AUTOENCODER}
        return dataclasses.replace(info, capabilities=info.capabilities | extra)

    def schedule(self, num_steps: int, sample_shape: Sequence[int]) -> list[float]:
        return shifted_sigmas(num_steps, 1.0 + sum(sample_shape)).tolist()

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels / 2

    def decode(self, latents: Tensor) -> Tensor:
        return latents * 2


class BrokenSchedule(ScheduledMixture):
    def schedule(self, num_steps: int, sample_shape: Sequence[int]) -> list[float]:
        return [1.0, 0.5, 0.7][: num_steps + 1]


class Scene:
    """A constraint that renders named tensors from its condition's scalars."""

    def __init__(self, size: float = 0.0) -> None:
        self.size = size

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            "scene", ExpertKind.CONSTRAINT, frozenset({Capability.RENDER}), pixel_input=True
        )

    def log_potential(self, x0: Tensor) -> Tensor:
        return torch.zeros(x0.shape[0], dtype=x0.dtype)

    def prepare(self, condition: Condition) -> Scene:
        if "size" not in condition.scalars:
            raise ExpertError.invalid("condition.scalars[size]", "required")
        return Scene(condition.scalars["size"])

    def render(self) -> dict[str, Tensor]:
        n = int(self.size)
        return {
            "mask": torch.ones(2, 1, n, n, dtype=torch.bool),
            "depth": torch.full((2, 1, n, n), self.size / 10),
        }


def _mixture(cls: type[GaussianMixture] = ScheduledMixture) -> GaussianMixture:
    return cls([[-1.0, 0.0], [1.0, 0.5]], [[0.5, 0.5], [0.5, 0.5]], [0.4, 0.6], name="mix")


def test_expert_schedule_sets_the_grid_in_process_and_remotely(loop: LoopThread) -> None:
    settings = SamplerSettings(num_particles=16, num_steps=6, mcmc_steps=1, schedule="expert")
    local = sample([Factor(_mixture())], (2,), settings, generator=torch.Generator().manual_seed(3))
    expected = shifted_sigmas(6, 3.0)[1:-1].tolist()  # s = 1 + Σ S; the last step lands on x̂0
    assert [t.sigma for t in local.trace] == pytest.approx(expected, abs=1e-12)
    served = loop.serve(_mixture())
    with RemoteExpert.connect(served.address) as remote:
        assert remote.describe().supports(Capability.SCHEDULE)
        assert remote.schedule(6, (2,)) == pytest.approx(shifted_sigmas(6, 3.0).tolist())
        far = sample([Factor(remote)], (2,), settings, generator=torch.Generator().manual_seed(3))
    assert torch.equal(local.particles, far.particles)


def test_schedule_errors_name_the_field(loop: LoopThread) -> None:
    plain = loop.serve(_mixture(GaussianMixture))
    broken = loop.serve(_mixture(BrokenSchedule))
    served = loop.serve(_mixture())
    with RemoteExpert.connect(served.address) as remote:
        with pytest.raises(RemoteExpertError) as bad_steps:
            remote.schedule(0, (2,))
        assert (bad_steps.value.code, bad_steps.value.field) == (
            Code.INVALID_ARGUMENT,
            "num_steps",
        )
        with pytest.raises(RemoteExpertError) as bad_shape:
            remote.schedule(4, (2, 0))
        assert bad_shape.value.field == "sample_shape"
        assert remote.schedule(4, (2,))  # still serving
    with RemoteExpert.connect(plain.address) as remote:
        with pytest.raises(RemoteExpertError) as none:
            remote.schedule(4, (2,))
        assert none.value.code == Code.FAILED_PRECONDITION
    with RemoteExpert.connect(broken.address) as remote:
        with pytest.raises(RemoteExpertError) as internal:
            remote.schedule(2, (2,))
        assert internal.value.code == Code.INTERNAL
    with pytest.raises(ValueError, match="schedule"):
        sample(
            [Factor(_mixture(GaussianMixture))], (2,),
            SamplerSettings(num_particles=4, num_steps=3, schedule="expert"),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip


def test_render_returns_named_tensors_of_the_prepared_condition(loop: LoopThread) -> None:
    served = loop.serve(Scene())
    condition = expert_pb2.Condition(scalars={"size": 4.0})
    with RemoteExpert.connect(served.address, condition=condition) as scene:
        info = scene.describe()
        assert info.supports(Capability.RENDER) and info.pixel_input
        everything = scene.render()
        assert sorted(everything) == ["depth", "mask"]
        assert everything["mask"].dtype == torch.bool and everything["mask"].shape == (2, 1, 4, 4)
        assert torch.allclose(everything["depth"], torch.full((2, 1, 4, 4), 0.4))
        assert list(scene.render(["depth"])) == ["depth"]
        with pytest.raises(RemoteExpertError) as unknown:
            scene.render(["normals"])
        assert (unknown.value.code, unknown.value.field) == (
            Code.INVALID_ARGUMENT,
            "names",
        )
        assert "depth" in scene.render(["depth"])  # still serving


def test_render_needs_the_capability_and_a_known_handle(loop: LoopThread) -> None:
    served = loop.serve(_mixture())
    with RemoteExpert.connect(served.address) as remote:
        with pytest.raises(RemoteExpertError) as none:
            remote.render()
        assert none.value.code == Code.FAILED_PRECONDITION
    scene = loop.serve(Scene())
    with RemoteExpert.connect(scene.address) as remote:
        remote._handle = "no-such-handle"  # a handle the server never gave
        with pytest.raises(RemoteExpertError) as unknown:
            remote.render()
        assert unknown.value.code == Code.NOT_FOUND
        remote._handle = ""
    cond = expert_pb2.Condition(scalars={"size": 2.0})
    with RemoteExpert.connect(scene.address, condition=cond) as remote:
        assert remote.render()["mask"].shape == (2, 1, 2, 2)


def test_remote_encode_and_decode_in_chunks(loop: LoopThread) -> None:
    served = loop.serve(ScheduledMixture([[0.0, 0.0]], [[1.0, 1.0]], [1.0], name="ae", max_batch=2))
    with RemoteExpert.connect(served.address) as remote:
        assert remote.describe().supports(Capability.AUTOENCODER)
        assert remote.describe().max_batch == 2
        pixels = torch.rand(5, 3, 4, 4) * 2 - 1
        latents = remote.encode(pixels)
        assert torch.equal(latents, pixels / 2)
        assert torch.equal(remote.decode(latents), pixels)
        with pytest.raises(RemoteExpertError) as bad:
            remote.decode(torch.zeros(2, 3))
        assert bad.value.field == "latents.shape"
