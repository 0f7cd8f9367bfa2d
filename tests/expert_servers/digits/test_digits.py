"""The shipped digit experts: the training script, the weights, and a composition that works.

The training smoke test runs the real script for a few iterations into a temporary folder; the
other tests load the shipped safetensors through the generic adapters (FlowAdapter,
ClassifierAdapter) and sample with the kernel.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from poegen.expert_servers.digits import (
    MODEL_NAMES,
    compose,
    held_out_indices,
    model_path,
    training_record,
    weights_dir,
)
from poegen.expert_servers.digits.data import load_digits16, split_indices
from poegen.expert_servers.digits.train import main as train_main
from poegen.kernel import Capability, ExpertKind, Factor, SamplerSettings, sample
from poegen.kernel.experts import check_expert

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_training_script_runs_a_few_iterations(tmp_path):
    from diffusers import UNet2DModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    threads = torch.get_num_threads()
    train_main(["--out", str(tmp_path), "--flow-steps", "2", "--classifier-steps", "2"])
    # process-wide state is restored: subnormal floats still exist, the thread count is back
    assert torch.tensor([5e-324], dtype=torch.float64).mul(1.0).item() > 0
    assert torch.get_num_threads() == threads
    record = json.loads((tmp_path / "training.json").read_text())
    assert set(record["models"]) == set(MODEL_NAMES)
    for name in ("flow-all", "flow-0to4", "flow-even"):
        model = UNet2DModel.from_pretrained(tmp_path / name)
        assert model.config.in_channels == 1 and model.config.sample_size == 16
    for name in ("classifier-reward", "classifier-judge"):
        model = AutoModelForImageClassification.from_pretrained(tmp_path / name)
        assert model.config.id2label[3] == "three"
        assert AutoImageProcessor.from_pretrained(tmp_path / name).size["height"] == 16
    assert record["models"]["flow-0to4"]["classes"] == [0, 1, 2, 3, 4]
    assert record["models"]["flow-even"]["train_size"] < record["models"]["flow-all"]["train_size"]


def test_shipped_weights_are_small_safetensors_with_their_record():
    record = training_record()
    files = [p for p in weights_dir().rglob("*") if p.is_file()]
    assert all(p.suffix in {".json", ".safetensors"} for p in files), files
    total = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert total == record["total_bytes"] and total < 5_000_000
    for name in MODEL_NAMES:
        assert (model_path(name) / "config.json").is_file()
    # the recorded held-out digits are the split of the data module, never trained on
    digits = load_digits16()
    train, test = split_indices(len(digits.labels))
    assert held_out_indices() == test.tolist()
    assert not set(train.tolist()) & set(held_out_indices())
    assert record["models"]["classifier-reward"]["test_accuracy"] > 0.95
    assert record["models"]["classifier-judge"]["test_accuracy"] > 0.95


def test_shipped_flow_priors_load_through_flow_adapter_and_sample_digits():
    experts = compose.load_experts()
    judge = experts.judge
    for name, flow in experts.flows.items():
        info = check_expert(flow)
        assert info.kind == ExpertKind.GENERATIVE and info.supports(Capability.SCHEDULE)
        result = sample(
            [Factor(flow)],
            compose.SAMPLE_SHAPE,
            SamplerSettings(num_particles=24, num_steps=10, mcmc_steps=0),
            generator=torch.Generator().manual_seed(0),
        )
        x = result.particles
        assert x.shape == (24, *compose.SAMPLE_SHAPE) and torch.isfinite(x).all()
        probs = judge.log_probs(compose.to_pixels(x)).exp()
        classes = probs.argmax(-1)
        # samples look like digits to a classifier that never saw them, several classes
        assert probs.max(-1).values.mean() > 0.6, name
        assert len(set(classes.tolist())) >= 3, name
        if name == "flow-0to4":
            assert (classes <= 4).float().mean() > 0.7
        if name == "flow-even":
            assert (classes % 2 == 0).float().mean() > 0.7


def test_reward_steers_the_prior_toward_the_label():
    experts = compose.load_experts()
    settings = SamplerSettings(
        num_particles=32, num_steps=12, mcmc_steps=1, step_size=compose.REWARD_STEP
    )
    kw = dict(generator=torch.Generator().manual_seed(1))
    steered = sample(compose.reward_factors(experts), compose.SAMPLE_SHAPE, settings, **kw)
    plain = sample(compose.reward_factors(experts)[:1], compose.SAMPLE_SHAPE, settings, **kw)

    def share(result) -> float:
        classes = experts.judge.log_probs(compose.to_pixels(result.particles)).argmax(-1)
        return float((result.weights * (classes == compose.TARGET_DIGIT)).sum())

    assert share(steered) > 0.6 and share(plain) < 0.3


@pytest.mark.slow
def test_digits_demo_runs_through_a_local_stack(tmp_path, capsys):
    from PIL import Image

    from poegen.clients.demo import DemoOptions
    from poegen.clients.digits_demo import run

    out = tmp_path / "sheet.png"
    assert run(DemoOptions(out=out, particles=8, steps=4, threads=1)) == 0
    printed = capsys.readouterr().out
    assert "prior x 'is a three'" in printed and str(out.resolve()) in printed
    sheet = Image.open(out)
    assert sheet.size[0] > 600 and sheet.size[1] > 250
