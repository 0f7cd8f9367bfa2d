"""FlowAdapter: a diffusers UNet2DModel trained on flow velocity, served as a generative expert."""

from __future__ import annotations

import itertools

import grpc
import pytest
import torch
from diffusers import UNet2DModel
from helpers.server import collect, rpc_error, run, running
from helpers.timing import scaled

from poegen.expert_servers.flow import FlowAdapter
from poegen.expert_servers.server import Condition, ModelRef, ServerConfig
from poegen.kernel import codec
from poegen.kernel.errors import ExpertError
from poegen.kernel.experts import Capability, ExpertKind, check_expert
from poegen.kernel.refusal import Code
from poegen.v1 import expert_pb2 as pb

ADMIN = "admin-secret"
ADMIN_MD = (("x-poegen-admin-token", ADMIN),)


def _load(flow_models, name: str, **options: str):
    ref = ModelRef(name, flow_models.path(name))
    return FlowAdapter().load(ref, options, lambda f, m: None).expert


def _batch(seed: int = 0, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.tensor([1.0, 0.5, 0.02])[:batch]


def test_velocity_is_the_model_at_t_equal_sigma_times_1000(flow_models):
    expert = _load(flow_models, "unet")
    info = check_expert(expert)
    assert info.kind == ExpertKind.GENERATIVE
    assert info.supports(Capability.SCHEDULE) and not info.supports(Capability.AUTOENCODER)
    assert info.latent_space == "pixels-1" and info.model_id == "unet"
    model = UNet2DModel.from_pretrained(flow_models.path("unet")).eval()
    x, sigma = _batch()
    with torch.no_grad():
        want = model(x, sigma * 1000).sample
        got = expert.velocity(x, sigma)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_class_label_condition_reaches_the_model(flow_models):
    expert = _load(flow_models, "unet_classes")
    model = UNet2DModel.from_pretrained(flow_models.path("unet_classes")).eval()
    x, sigma = _batch()
    view = expert.prepare(Condition(scalars={"class_label": 3.0}))
    with torch.no_grad():
        want = model(x, sigma * 1000, class_labels=torch.full((3,), 3)).sample
        got = view.velocity(x, sigma)
        other = expert.prepare(Condition(scalars={"class_label": 4.0})).velocity(x, sigma)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, other)
    assert expert.prepare(Condition()) is expert


def test_timestep_scale_option_and_schedule(flow_models):
    expert = _load(flow_models, "unet", timestep_scale="1")
    model = UNet2DModel.from_pretrained(flow_models.path("unet")).eval()
    x, sigma = _batch()
    with torch.no_grad():
        torch.testing.assert_close(expert.velocity(x, sigma), model(x, sigma).sample)
    sigmas = expert.schedule(4, (1, 16, 16))
    assert len(sigmas) == 5 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(sigmas))


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (Condition(scalars={"class_label": 10.0}), "condition.scalars[class_label]"),
        (Condition(scalars={"class_label": 1.5}), "condition.scalars[class_label]"),
        (Condition(scalars={"label": 1.0}), "condition.scalars[label]"),
        (Condition(text="a digit"), "condition.text"),
    ],
)
def test_bad_conditions_name_the_field(flow_models, condition, field):
    with pytest.raises(ExpertError) as err:
        _load(flow_models, "unet_classes").prepare(condition)
    assert err.value.field == field and err.value.code == Code.INVALID_ARGUMENT


def test_unconditional_model_refuses_a_class_label(flow_models):
    with pytest.raises(ExpertError) as err:
        _load(flow_models, "unet").prepare(Condition(scalars={"class_label": 1.0}))
    assert err.value.field == "condition.scalars[class_label]"


def test_bad_options_and_folders(flow_models, tmp_path):
    adapter = FlowAdapter()
    ref = ModelRef("unet", flow_models.path("unet"))
    for options, field in [({"torch_dtype": "int8"}, "options[torch_dtype]"),
                           ({"timestep_scale": "-1"}, "options[timestep_scale]"),
                           ({"nope": "1"}, "options[nope]")]:  # fmt: skip
        with pytest.raises(ExpertError) as err:
            adapter.load(ref, options, lambda f, m: None)
        assert err.value.field == field
    with pytest.raises(ExpertError) as err:
        adapter.load(ModelRef("gone", tmp_path / "gone"), {}, lambda f, m: None)
    assert err.value.code == Code.NOT_FOUND and str(tmp_path) not in str(err.value)
    with pytest.raises(ExpertError) as err:
        adapter.load(ModelRef("flux", flow_models.path("flux")), {}, lambda f, m: None)
    assert err.value.field == "model_id" and "flux" in err.value.reason
    assert str(flow_models.root) not in str(err.value)


def test_served_over_grpc_load_velocity_and_bad_input(flow_models):
    flow_models.path("unet_classes")
    flow_models.path("flux")
    config = ServerConfig(model_root=flow_models.root, admin_token=ADMIN)
    x, sigma = _batch()
    local = _load(flow_models, "unet_classes")
    with torch.no_grad():
        want = local.prepare(Condition(scalars={"class_label": 7.0})).velocity(x, sigma)

    async def body() -> None:
        async with running(config, adapter=FlowAdapter()) as server:
            events = await collect(
                server.stub.LoadModel(
                    pb.LoadModelRequest(model_id="unet_classes", options={"max_batch": "8"}),
                    metadata=ADMIN_MD,
                )
            )
            assert events[-1].stage == pb.LOAD_STAGE_READY
            described = await server.stub.Describe(pb.DescribeRequest())
            assert described.latent_space == "pixels-1" and described.max_batch == 8
            prepared = await server.stub.Prepare(
                pb.PrepareRequest(condition=pb.Condition(scalars={"class_label": 7.0}))
            )
            reply = await server.stub.Velocity(
                pb.VelocityRequest(
                    x=codec.encode(x), sigma=codec.encode(sigma), handle=prepared.handle
                )
            )
            torch.testing.assert_close(
                codec.decode(reply.velocity, field="v"), want, rtol=0, atol=0
            )
            wrong = torch.zeros(1, 3, 16, 16)
            code, err = await rpc_error(
                server.stub.Velocity(
                    pb.VelocityRequest(x=codec.encode(wrong), sigma=codec.encode(torch.ones(1)))
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "x.shape"
            code, err = await rpc_error(
                server.stub.Velocity(
                    pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma + 1))
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "sigma"
            code, err = await rpc_error(
                server.stub.Velocity(
                    pb.VelocityRequest(x=codec.encode(x), sigma=codec.encode(sigma), handle="nope")
                )
            )
            assert code == grpc.StatusCode.NOT_FOUND and err.field == "handle"
            code, err = await rpc_error(
                collect(
                    server.stub.LoadModel(pb.LoadModelRequest(model_id="flux"), metadata=ADMIN_MD)
                )
            )
            assert err.field == "model_id" and str(flow_models.root) not in err.reason
            again = await server.stub.Velocity(
                pb.VelocityRequest(
                    x=codec.encode(x), sigma=codec.encode(sigma), handle=prepared.handle
                )
            )
            torch.testing.assert_close(
                codec.decode(again.velocity, field="v"), want, rtol=0, atol=0
            )

    run(body(), timeout=scaled(120))


def test_pickled_weights_are_refused(tmp_path):
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    with pytest.raises(ExpertError) as err:
        FlowAdapter().load(ModelRef("pickled", tmp_path / "pickled"), {}, lambda f, m: None)
    assert err.value.field == "model_id" and str(tmp_path) not in str(err.value)


def test_an_allowlisted_hub_id_loads_from_the_local_cache(flow_models, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--digits"
    shutil.copytree(flow_models.path("unet"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    expert = FlowAdapter().load(ModelRef("org/digits", None), {}, lambda f, m: None).expert
    assert (expert.describe().model_id, expert.describe().revision) == ("org/digits", commit)
    with pytest.raises(ExpertError) as err:
        FlowAdapter().load(ModelRef("org/absent", None), {}, lambda f, m: None)
    assert err.value.code == Code.NOT_FOUND and err.value.field == "model_id"
