"""ClassifierAdapter: any transformers image classifier as a reward log p(label | pixels).

Tiny random classifiers are built from configs and saved with ``save_pretrained`` (a ResNet
whose processor resizes, a ViT tied to 16×16 whose processor does not); the shipped digits
classifier is served over real gRPC.
"""

from __future__ import annotations

import os

import grpc
import pytest
import torch
from helpers.server import collect, rpc_error, run, running
from helpers.timing import scaled

from poegen.expert_servers.classifier import ClassifierAdapter
from poegen.expert_servers.digits import model_path, weights_dir
from poegen.expert_servers.server import Condition, ModelRef, ServerConfig
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import ExpertKind, check_expert
from poegen.kernel.refusal import Code
from poegen.v1 import expert_pb2 as pb

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)
NAMES = ("cat", "dog", "bird")


def _labels() -> dict:
    return dict(
        num_labels=3, id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)}
    )


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """``resnet`` (1 channel, resizing processor) and ``vit`` (3 channels, fixed 16×16)."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(
        ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                     layer_type="basic", **_labels())
    )  # fmt: skip
    resnet.save_pretrained(root / "resnet")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(root / "resnet")  # fmt: skip
    vit = ViTForImageClassification(
        ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32, **_labels())
    )  # fmt: skip
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(root / "vit")  # fmt: skip
    (root / "no_processor").mkdir()
    resnet.save_pretrained(root / "no_processor")
    # the same classifier as a pickled checkpoint (pytorch_model.bin), written here only to be
    # refused: the loader must not fall back to it
    resnet.save_pretrained(root / "pickled")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save(resnet.state_dict(), root / "pickled" / "pytorch_model.bin")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(root / "pickled")  # fmt: skip
    return root


def _load(root, name: str, **options: str):
    return ClassifierAdapter().load(ModelRef(name, root / name), options, lambda f, m: None).expert


def _pixels(batch: int = 4, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_log_potential_is_the_models_log_softmax_of_the_label(tiny_root):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    expert = _load(tiny_root, "resnet")
    info = check_expert(expert)
    assert info.kind == ExpertKind.DISCRIMINATIVE and info.pixel_input
    model = AutoModelForImageClassification.from_pretrained(tiny_root / "resnet").eval()
    processor = AutoImageProcessor.from_pretrained(tiny_root / "resnet")
    pixels = _pixels()
    values = processor(images=pixels, return_tensors="pt", input_data_format="channels_first", do_rescale=False)["pixel_values"]  # fmt: skip
    # the processor's normalisation: (p - 0.5) / 0.5, up to its 8-bit resize
    torch.testing.assert_close(values, (pixels - 0.5) / 0.5, rtol=0, atol=0.01)
    with torch.no_grad():
        want = model(pixel_values=values).logits.log_softmax(-1)
    for condition, label in [(Condition(text="dog"), 1), (Condition(text="2"), 2),
                             (Condition(text=" Cat "), 0), (Condition(scalars={"label": 1.0}), 1)]:  # fmt: skip
        got = expert.prepare(condition).log_potential(pixels)
        assert got.shape == (4,)
        torch.testing.assert_close(got, want[:, label], rtol=1e-5, atol=1e-5)
    # probabilities over the labels sum to one
    total = sum(expert.prepare(Condition(text=n)).log_potential(pixels).exp() for n in NAMES)
    torch.testing.assert_close(total, torch.ones(4), rtol=1e-5, atol=1e-5)


def test_other_image_sizes_go_through_the_processors_resize(tiny_root):
    expert = _load(tiny_root, "resnet").prepare(Condition(text="cat"))
    big = _pixels(size=32)
    small = torch.nn.functional.interpolate(big, size=16, mode="bilinear", antialias=True)
    got = expert.log_potential(big)
    assert got.shape == (4,) and torch.isfinite(got).all()
    # the processor's bilinear resize, not ours: close to an antialiased torch resize
    torch.testing.assert_close(got, expert.log_potential(small), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (Condition(text="horse"), "condition.text"),
        (Condition(text="7"), "condition.text"),
        (Condition(), "condition.text"),
        (Condition(scalars={"label": 5.0}), "condition.scalars[label]"),
        (Condition(scalars={"label": 0.5}), "condition.scalars[label]"),
        (Condition(scalars={"class": 1.0}), "condition.scalars[class]"),
        (Condition(text="cat", scalars={"label": 0.0}), "condition"),
        (Condition(tensors={"image": torch.zeros(2)}), "condition.tensors[image]"),
    ],
)
def test_unknown_labels_name_the_field(tiny_root, condition, field):
    expert = _load(tiny_root, "resnet")
    with pytest.raises(ExpertError) as err:
        expert.prepare(condition)
    assert err.value.code == Code.INVALID_ARGUMENT and err.value.field == field
    if field == "condition.text" and condition.text:
        assert "cat" in err.value.reason  # lists the known labels


def test_bad_pixels_name_the_field(tiny_root):
    resnet = _load(tiny_root, "resnet").prepare(Condition(text="cat"))
    vit = _load(tiny_root, "vit").prepare(Condition(text="cat"))
    assert vit.log_potential(_pixels(channels=3)).shape == (4,)
    cases = [
        (resnet, _pixels(channels=3), "x.shape"),
        (resnet, torch.rand(4, 16, 16), "x.shape"),
        (resnet, torch.zeros(4, 1, 16, 16, dtype=torch.uint8), "x.dtype"),
        (resnet, torch.full((4, 1, 16, 16), float("nan")), "x"),
        (vit, _pixels(channels=3, size=24), "x.shape"),  # fixed size, processor does not resize
    ]
    for expert, pixels, field in cases:
        with pytest.raises(ExpertError) as err:
            expert.log_potential(pixels)
        assert err.value.code == Code.INVALID_ARGUMENT and err.value.field == field
    with pytest.raises(ExpertError) as err:
        _load(tiny_root, "resnet").log_potential(_pixels())
    assert err.value.field == "condition"


def test_bad_folders_and_options(tiny_root, tmp_path):
    assert (tiny_root / "pickled" / "pytorch_model.bin").is_file()
    assert not list((tiny_root / "pickled").glob("*.safetensors"))
    adapter = ClassifierAdapter()
    invalid, not_found = Code.INVALID_ARGUMENT, Code.NOT_FOUND
    cases = [
        (ModelRef("gone", tmp_path / "gone"), {}, "model_id", not_found),
        (ModelRef("np", tiny_root / "no_processor"), {}, "model_id", invalid),
        (ModelRef("pickled", tiny_root / "pickled"), {}, "model_id", invalid),
        (ModelRef("r", tiny_root / "resnet"), {"nope": "1"}, "options[nope]", invalid),
    ]
    for ref, options, field, code in cases:
        with pytest.raises(ExpertError) as err:
            adapter.load(ref, options, lambda f, m: None)
        assert err.value.field == field and err.value.code == code
        assert str(tmp_path) not in str(err.value) and str(tiny_root) not in str(err.value)


def _held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from poegen.expert_servers.digits import held_out_indices
    from poegen.expert_servers.digits.data import load_digits16

    digits = load_digits16()
    idx = torch.tensor(held_out_indices())
    return (digits.x0[idx] + 1) / 2, digits.labels[idx]


def test_shipped_reward_classifier_served_over_grpc():
    pixels, labels = _held_out_digits()
    pixels, labels = pixels[:64], labels[:64]
    config = ServerConfig(model_root=weights_dir(), admin_token=ADMIN)
    assert model_path("classifier-reward").is_dir()

    async def body() -> None:
        async with running(config, adapter=ClassifierAdapter()) as server:
            events = await collect(
                server.stub.LoadModel(
                    pb.LoadModelRequest(model_id="classifier-reward"), metadata=ADMIN_MD
                )
            )
            assert events[-1].stage == pb.LOAD_STAGE_READY
            described = await server.stub.Describe(pb.DescribeRequest())
            assert described.pixel_input
            scores = []
            for name in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"):  # fmt: skip
                handle = (
                    await server.stub.Prepare(pb.PrepareRequest(condition=pb.Condition(text=name)))
                ).handle
                reply = await server.stub.LogProb(
                    pb.LogProbRequest(x=codec.encode(pixels), handle=handle)
                )
                scores.append(codec.decode(reply.log_prob, field="log_prob"))
            predicted = torch.stack(scores, 1).argmax(1)
            assert (predicted == labels).float().mean() > 0.9
            code, err = await rpc_error(
                server.stub.Prepare(pb.PrepareRequest(condition=pb.Condition(text="eleven")))
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "condition.text"
            handle = (
                await server.stub.Prepare(pb.PrepareRequest(condition=pb.Condition(text="3")))
            ).handle
            code, err = await rpc_error(
                server.stub.LogProb(
                    pb.LogProbRequest(x=codec.encode(torch.rand(2, 3, 16, 16)), handle=handle)
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "x.shape"
            resized = await server.stub.LogProb(
                pb.LogProbRequest(x=codec.encode(torch.rand(2, 1, 28, 28)), handle=handle)
            )
            assert codec.decode(resized.log_prob, field="log_prob").shape == (2,)

    run(body(), timeout=scaled(120))
