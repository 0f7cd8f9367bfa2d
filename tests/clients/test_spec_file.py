"""Generation specs: YAML/JSON files, errors naming the exact path, regions, conditions, wire."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from poegen.clients.files import SpecError
from poegen.clients.spec import (
    GenerationSpec,
    Region,
    SpecBuilder,
    json_schema,
    settings_to_proto,
    to_request,
)
from poegen.kernel import codec
from poegen.kernel.spec import SamplerSettings

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def _errors(path: Path) -> SpecError:
    with pytest.raises(SpecError) as error:
        GenerationSpec.from_file(path)
    return error.value


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"experts": []}, "experts"),
        (
            {
                "experts": [
                    {"address": "a:1"},
                    {"address": "b:1"},
                    {"address": "c:1", "region": {"box": [[4, 2]]}},
                ]
            },
            "experts[2].region.box",
        ),
        ({"experts": [{"address": "a:1", "region": {}}]}, "experts[0].region"),
        ({"experts": [{"address": "nocolon"}]}, "experts[0].address"),
        ({"experts": [{"address": "a:1", "endpoint": "x"}]}, "experts[0]"),
        ({"experts": [{"address": "a:1", "weight": "heavy"}]}, "experts[0].weight"),
        ({"experts": [{"address": "a:1", "colour": "red"}]}, "experts[0].colour"),
        (
            {"experts": [{"address": "a:1"}], "settings": {"num_particles": 0}},
            "settings.num_particles",
        ),
        ({"experts": [{"address": "a:1"}], "settings": {"preset": "fast"}}, "settings.preset"),
        ({"experts": [{"address": "a:1"}], "settings": {"mcmc": "gibbs"}}, "settings.mcmc"),
        ({"experts": [{"address": "a:1"}], "sample_shape": [2, 0]}, "sample_shape"),
        (
            {"experts": [{"address": "a:1", "condition": {"tensors": {"image": "missing.png"}}}]},
            "experts[0].condition.tensors.image.file",
        ),
        (
            {"experts": [{"address": "a:1", "condition": {"scalars": {"g": "x"}}}]},
            "experts[0].condition.scalars.g",
        ),
        (
            {
                "experts": [
                    {
                        "address": "a:1",
                        "links": [{"tensor": "d", "source": "nope", "output": "depth"}],
                    }
                ]
            },
            "experts[0].links[0].source",
        ),
        ({"experts": [{"address": "a:1"}], "output": {"samples": -1}}, "output.samples"),
        ({"experts": [{"address": "a:1", "parents": {"b": -1.0}}]}, "experts[0].parents"),
        ({"experts": [{"address": "a:1", "parents": {"b": "x"}}]}, "experts[0].parents.b"),
    ],
)
def test_errors_name_the_exact_path(tmp_path: Path, data: dict, path: str) -> None:
    error = _errors(_write(tmp_path, data))
    assert path in error.paths or any(path in message for _, message in error.problems), error
    assert str(error).startswith(str(tmp_path / "spec.yaml"))


def test_not_yaml_and_not_a_mapping_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n  - a")
    assert "not valid YAML/JSON at line" in str(_errors(bad))
    bad.write_text("- just\n- a list\n")
    assert "must be a mapping" in str(_errors(bad))
    assert "cannot read" in str(_errors(tmp_path / "absent.yaml"))


def test_json_and_yaml_read_the_same(tmp_path: Path) -> None:
    data = {"seed": 4, "experts": [{"address": "a:1", "weight": 2.0}], "settings": {"num_steps": 9}}
    from_yaml = GenerationSpec.from_file(_write(tmp_path, data))
    from_json = GenerationSpec.from_file(_write(tmp_path, data, "spec.json"))
    assert from_yaml == from_json
    assert from_yaml.settings.resolved().num_steps == 9


def test_settings_take_the_presets_defaults_and_only_given_fields_go_on_the_wire() -> None:
    spec = GenerationSpec.from_mapping(
        {"experts": [{"address": "a:1"}], "settings": {"preset": "paper", "num_particles": 7}}
    )
    assert spec.settings.resolved() == SamplerSettings.paper(num_particles=7)
    wire = settings_to_proto(spec.settings)
    assert wire.preset == "paper" and wire.num_particles == 7
    assert not wire.HasField("num_steps") and not wire.HasField("ess_threshold")


def test_box_region_covers_the_trailing_dimensions() -> None:
    mask = Region(box=[(1, 3), (0, 2)]).to_tensor((2, 4, 4))
    expected = torch.zeros(2, 4, 4)
    expected[:, 1:3, 0:2] = 1
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="size 4"):
        Region(box=[(0, 5)]).to_tensor((2, 4))


def test_mask_regions_from_an_image_and_a_safetensors_file(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:, 4:] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    save_file({"mask": torch.tensor([[0.0, 0.5], [1.0, 1.0]])}, str(tmp_path / "mask.safetensors"))
    spec = GenerationSpec.from_file(
        _write(
            tmp_path,
            {
                "experts": [
                    {"address": "a:1", "region": {"mask": "mask.png"}},  # relative to the file
                    {"address": "b:1", "region": {"mask": {"file": "mask.safetensors"}}},
                ]
            },
        )
    )
    from_image = spec.experts[0].region.to_tensor((3, 4, 4))  # resized 8×8 → 4×4, broadcast
    assert from_image.shape == (3, 4, 4)
    assert torch.equal(from_image[:, :, :2], torch.zeros(3, 4, 2))
    assert torch.equal(from_image[:, :, 2:], torch.ones(3, 4, 2))
    from_tensor = spec.experts[1].region.to_tensor((2, 2, 2))
    assert torch.equal(from_tensor[1], torch.tensor([[0.0, 0.5], [1.0, 1.0]]))


def test_conditions_load_images_tensors_and_scalars(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    save_file({"depth": torch.arange(6.0).reshape(2, 3), "other": torch.zeros(1)},
              str(tmp_path / "scene.safetensors"))  # fmt: skip
    spec = GenerationSpec.from_file(
        _write(
            tmp_path,
            {
                "experts": [
                    {
                        "address": "a:1",
                        "condition": {
                            "text": "a red cube",
                            "negative_text": "blurry",
                            "tensors": {
                                "control_image": "red.png",
                                "depth01": {"file": "red.png", "range": [0, 1], "mode": "L"},
                                "depth": {"file": "scene.safetensors", "key": "depth"},
                            },
                            "scalars": {"guidance": 3.5},
                        },
                    }
                ]
            },
        )
    )
    wire = to_request(spec, (2,)).factors[0].condition
    assert wire.text == "a red cube" and wire.scalars["guidance"] == 3.5
    assert wire.negative_text == "blurry"
    image = codec.decode(wire.tensors["control_image"], field="t")
    assert image.shape == (3, 4, 6)
    assert torch.equal(image[0], torch.ones(4, 6)) and torch.equal(image[1], -torch.ones(4, 6))
    gray = codec.decode(wire.tensors["depth01"], field="t")
    assert gray.shape == (1, 4, 6) and 0 < gray.max() < 1  # red in luminance, mapped to [0, 1]
    assert torch.equal(
        codec.decode(wire.tensors["depth"], field="t"), torch.arange(6.0).reshape(2, 3)
    )
    ambiguous = spec.experts[0].condition.tensors["depth"].model_copy(update={"key": None})
    with pytest.raises(ValueError, match="say which with key"):
        ambiguous.load()


def test_request_resolves_endpoints_links_and_sources() -> None:
    spec = GenerationSpec.from_mapping(
        {
            "seed": 9,
            "preview": True,
            "experts": [
                {"endpoint": "flux", "region": {"box": [[0, 1]]}, "links": [
                    {"tensor": "control_image", "source": "scene", "output": "depth"}]},
                {"address": "127.0.0.1:7", "name": "judge", "weight": 5.0},
            ],
            "sources": [{"name": "scene", "endpoint": "physics", "condition": {"text": "cubes"}}],
        }
    )  # fmt: skip
    request = to_request(spec, (2,), {"flux": "127.0.0.1:5", "physics": "127.0.0.1:6"})
    first, second = request.factors
    assert (first.address, first.name, first.weight) == ("127.0.0.1:5", "flux", 1.0)
    assert torch.equal(codec.decode(first.region, field="r"), torch.tensor([1.0, 0.0]))
    assert [(k.tensor, k.source, k.output) for k in first.links] == [
        ("control_image", "scene", "depth")
    ]  # fmt: skip
    assert (second.address, second.name, second.weight) == ("127.0.0.1:7", "judge", 5.0)
    assert [(s.name, s.address, s.condition.text) for s in request.sources] == [
        ("scene", "127.0.0.1:6", "cubes")
    ]
    assert (request.seed, request.preview, list(request.sample_shape)) == (9, True, [2])
    with pytest.raises(SpecError) as error:
        to_request(spec, (2,), {"flux": "127.0.0.1:5"})
    assert error.value.paths == ("sources[0].endpoint",)


def test_parents_make_a_conditional_expert_on_the_wire(tmp_path: Path) -> None:
    """``parents`` in a spec file and in the builder: the same ``FactorSpec.parents``."""
    loaded = GenerationSpec.from_file(
        _write(
            tmp_path,
            {"experts": [{"endpoint": "fill", "parents": {"depth": 0.5}}, {"endpoint": "depth"}]},
        )
    )
    built = (
        SpecBuilder()
        .expert(endpoint="fill", parents={"depth": 0.5})
        .expert(endpoint="depth")
        .build()
    )
    endpoints = {"fill": "h:1", "depth": "h:2"}
    request = to_request(loaded, (2,), endpoints)
    assert dict(request.factors[0].parents) == {"depth": 0.5}
    assert not request.factors[1].parents
    assert to_request(built, (2,), endpoints) == request


def test_the_builder_makes_the_same_spec_as_a_file(tmp_path: Path) -> None:
    built = (
        SpecBuilder(seed=2, sample_shape=(2,))
        .expert(endpoint="ring")
        .expert("127.0.0.1:9", name="bar", weight=0.5, text="x", region=Region.of_box([(0, 1)]))
        .settings(num_particles=16)
        .output(decode="none")
        .build()
    )
    loaded = GenerationSpec.from_file(
        _write(
            tmp_path,
            {
                "seed": 2,
                "sample_shape": [2],
                "experts": [
                    {"endpoint": "ring"},
                    {"address": "127.0.0.1:9", "name": "bar", "weight": 0.5,
                     "condition": {"text": "x"}, "region": {"box": [[0, 1]]}},
                ],
                "settings": {"num_particles": 16},
                "output": {"decode": "none"},
            },
        )
    )  # fmt: skip
    assert to_request(built, (2,), {"ring": "h:1"}) == to_request(loaded, (2,), {"ring": "h:1"})
    with pytest.raises(SpecError, match=r"experts\[0\]"):
        SpecBuilder().expert().build()  # neither address nor endpoint


def test_examples_are_valid_specs_and_the_schema_describes_them() -> None:
    schema = json_schema()
    assert schema["title"] == "poegen generation spec"
    for path in sorted((REPO / "examples").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "experts" in data and isinstance(data["experts"], list) and "sampler" not in data:
            spec = GenerationSpec.from_file(path)
            assert set(data) <= set(schema["properties"]), path
            assert spec.experts
