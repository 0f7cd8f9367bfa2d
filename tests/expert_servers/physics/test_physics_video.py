"""The physics constraint in a video latent space: a falling ball encoded by a tiny Wan VAE
(4× in time, 8× in space), its mask pooled per latent frame, and the sampler with a tiny Wan
expert keeping the ball's fully covered latent cells on the encoded simulation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from poegen.expert_servers.flow import WanAdapter
from poegen.expert_servers.physics import PhysicsAdapter
from poegen.expert_servers.server import Condition, ModelRef
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings

SCENE = """
objects:
  - {name: ball, shape: sphere, size: [0.7], position: [0, 0, 1.4], colour: [0.9, 0.2, 0.1]}
camera: {position: [0, -2.5, 1.3], look_at: [0, 0, 1.3], fov: 40}
width: 32
height: 32
frames: 5
fps: 24
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _progress(fraction: float, message: str) -> None:
    del fraction, message


@pytest.fixture(scope="module")
def experts(flow_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("video-assets")
    shutil.copytree(flow_models.path("wan"), root / "wan")
    wan = WanAdapter().load(ModelRef("wan", root / "wan"), {}, _progress).expert
    physics = [
        PhysicsAdapter()
        .load(ModelRef("assets", root), {"autoencoder": "wan:wan", "mask_mode": mode}, _progress)
        .expert
        for mode in ("all", "fraction")
    ]
    return wan, *physics


def test_video_target_is_the_wan_encoding_and_the_mask_pools_per_latent_frame(experts) -> None:
    wan, physics, fractions = experts
    view = physics.prepare(Condition(text=SCENE))
    out = view.render()
    pixels = (2 * out["rgb"] - 1).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
    torch.testing.assert_close(out["target"], wan.encode(pixels)[0])
    # Wan's VAE: 4× in time (causal: 1 + 4k frames → 1 + k), 8× in space, 16 channels
    frames, size, time_step, cell = 5, 32, 4, 8
    latent_frames = 1 + (frames - 1) // time_step
    assert out["target"].shape == (16, latent_frames, size // cell, size // cell) == (16, 2, 4, 4)
    # mode "all", pooled by hand: a latent cell is 1 when the ball covers every pixel of its
    # 8×8 block in every pixel frame the latent frame encodes (frame 0; then frames 1–4)
    pixel = out["mask"][:, 0].numpy() > 0.5  # (F, H, W)
    assert pixel.shape == (frames, size, size) and pixel.any()
    groups = [[0]] + [list(range(1 + time_step * (j - 1), 1 + time_step * j))
                      for j in range(1, latent_frames)]  # fmt: skip
    blocks = pixel.reshape(frames, size // cell, cell, size // cell, cell)
    per_frame = blocks.all(axis=(2, 4))  # (F, 4, 4)
    expected = np.stack([per_frame[g].all(axis=0) for g in groups]).astype(np.float32)
    expected = np.broadcast_to(expected, (16, *expected.shape))
    assert np.array_equal(out["target_mask"].numpy(), expected)
    assert 0 < expected.sum() < expected.size  # the pooling decides something
    # mode "fraction": the covered share of each cell's pixels, averaged over the latent
    # frame's pixel frames (the ball moves: frames 1–4 average to other shares than frames
    # 0–3, so a grouping one frame off shows)
    share = blocks.mean(axis=(2, 4))
    want = np.stack([share[g].mean(axis=0) for g in groups])
    assert not np.allclose(want[1], share[:4].mean(axis=0), atol=1e-3)
    got = fractions.prepare(Condition(text=SCENE)).render()["target_mask"].numpy()
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=0, atol=1e-6)
    # latent frame 1 pools pixel frames 1–4: a cell counts only if the ball covers it in all four
    assert out["target_mask"][0, 0].sum() >= out["target_mask"][0, 1].sum() > 0


def test_sampler_with_wan_keeps_the_simulated_ball(experts) -> None:
    wan, physics, _ = experts
    view = physics.prepare(Condition(text=SCENE))
    out = view.render()
    prompt = wan.prepare(Condition(text="a ball falling"))
    settings = SamplerSettings(num_particles=2, mcmc_steps=1,
                               sigmas=(1.0, 0.6, 0.3, 0.1, 0.02, 0.004))  # fmt: skip
    result = sample([Factor(prompt), Factor(view)], (16, 2, 4, 4), settings,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    inside = out["target_mask"].bool().expand_as(result.particles)
    assert inside.any()
    error = (result.particles - out["target"]).abs()[inside].max()
    free = sample([Factor(prompt)], (16, 2, 4, 4), settings,
                  generator=torch.Generator().manual_seed(0)).particles  # fmt: skip
    assert float(error) < 0.1
    assert float((free - out["target"]).abs()[inside].max()) > 5 * float(error)
