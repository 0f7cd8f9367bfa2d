"""Generation specs: what to sample, from a YAML/JSON file or built in Python.

A spec names the experts of the product (by address, or by endpoint name in a local stack),
their weights, conditions, regions and links, the sampler's settings and the outputs::

    # spec.yaml
    seed: 0
    sample_shape: [2]                 # optional: else the first generative expert's own
    settings:                         # poegen.kernel.SamplerSettings fields, after `preset`
      preset: default                 # or "paper"
      num_particles: 512
      num_steps: 60
    experts:
      - endpoint: ring                # a name in the stack (`--stack`), or:
      - address: 127.0.0.1:50052      # host:port of an ExpertService
        name: bar
        weight: 1.0                   # exponent / reward scale
        region:                       # generative only: where its score counts
          box: [[0, 16], [8, 24]]     # [start, stop) per trailing sample dimension ...
          # mask: mask.png            # ... or a mask file (PNG/JPEG or .safetensors)
        # crop: [[0, 16], [8, 24]]    # the expert sees only this window of each sample
        # parents: {depth: 0.5}       # a conditional expert, pulled toward factor "depth"
        condition:
          text: "a red cube"
          tensors:
            control_image: {file: edges.png, range: [-1, 1]}   # images → (C, H, W) in range
            depth: {file: scene.safetensors, key: depth}        # or a tensor of a file
          scalars: {guidance: 3.5}
        links:                        # condition tensors rendered by another expert
          - {tensor: depth, source: scene, output: depth}
    sources:                          # experts used only to render conditions
      - name: scene
        address: 127.0.0.1:50060
        condition: {text: "two cubes"}
    output:
      decode: auto                    # auto | none: decode latents with the AUTOENCODER
      decoder: flux                   # which expert decodes (default: the first that can)
      samples: 8                      # PNGs written (highest weights first); 0: all
      fps: 8                          # video

Relative file paths resolve against the spec file's folder. Errors name the exact path
(``experts[2].region.box``) through :mod:`poegen.clients.files`.

The same spec in Python, with the builder::

    spec = (SpecBuilder(seed=0)
            .expert(endpoint="ring")
            .expert(address="127.0.0.1:50052", name="bar", region=Region.of_box([(0, 1)]))
            .settings(num_particles=512, num_steps=60)
            .build())

:func:`to_request` turns a spec into the wire's ``GenerateRequest`` (endpoint names resolved
through a mapping, regions and condition tensors loaded); :func:`json_schema` is the schema
editors use (``poegen schema``, ``docs/spec.schema.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from poegen.clients.files import load_model_file, resolve, validate_model
from poegen.kernel import codec
from poegen.kernel.spec import SamplerSettings
from poegen.v1 import expert_pb2, sampler_pb2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_SUFFIXES = (".safetensors",)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorFile(_Model):
    """A tensor read from a file: ``.safetensors`` (``key``, or its only tensor) or an image
    (``(C, H, W)`` float32 mapped from [0, 255] to ``range``)."""

    file: Path = Field(description="a .safetensors file or an image (PNG, JPEG, WebP)")
    key: str | None = Field(None, description=".safetensors: the tensor's name")
    range: tuple[float, float] = Field(
        (-1.0, 1.0), description="images: the values black and white map to"
    )
    mode: Literal["RGB", "L"] | None = Field(None, description="images: convert to this mode")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str | Path) else data

    @field_validator("file")
    @classmethod
    def _check_file(cls, path: Path, info: ValidationInfo) -> Path:
        path = resolve(path, info.context)
        if path.suffix.lower() not in (*IMAGE_SUFFIXES, *TENSOR_SUFFIXES):
            raise ValueError(f"{path.name}: expected .safetensors or an image (PNG, JPEG, WebP)")
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @field_validator("range")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(v) for v in value) or value[0] == value[1]:
            raise ValueError("needs two different finite values [black, white]")
        return value

    def load(self) -> torch.Tensor:
        """The tensor (images: ``(C, H, W)`` float32 in ``range``)."""
        if self.file.suffix.lower() in TENSOR_SUFFIXES:
            from safetensors.torch import load_file

            tensors = load_file(str(self.file))
            if self.key is None:
                if len(tensors) != 1:
                    raise ValueError(
                        f"{self.file.name}: holds {sorted(tensors)}; say which with key:"
                    )
                return next(iter(tensors.values()))
            if self.key not in tensors:
                raise ValueError(
                    f"{self.file.name}: no tensor {self.key!r} (has {sorted(tensors)})"
                )
            return tensors[self.key]
        return load_image(self.file, self.range, self.mode)


def load_image(
    path: Path, value_range: tuple[float, float] = (0.0, 1.0), mode: str | None = None
) -> torch.Tensor:
    """An image file as ``(C, H, W)`` float32, 0 → ``range[0]``, 255 → ``range[1]``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert(mode or ("L" if image.mode in ("L", "1", "I;16") else "RGB"))
        array = np.asarray(image, dtype=np.float32) / 255.0
    t = torch.from_numpy(array.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    low, high = value_range
    return (low + (high - low) * t).contiguous()


class ConditionSpec(_Model):
    """A condition: text, the negative prompt, named tensors (from files) and named scalars."""

    text: str = ""
    negative_text: str = Field("", description="negative prompt of classifier-free guidance")
    tensors: dict[str, TensorFile] = Field(default_factory=dict)
    scalars: dict[str, float] = Field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.text or self.negative_text or self.tensors or self.scalars)

    def to_proto(self) -> expert_pb2.Condition:
        return expert_pb2.Condition(
            text=self.text,
            negative_text=self.negative_text,
            tensors={name: codec.encode(t.load()) for name, t in self.tensors.items()},
            scalars=dict(self.scalars),
        )


def _check_spans(spans: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """A box's or crop's [start, stop) pairs: at least one, each 0 <= start < stop."""
    if spans is not None:
        if not spans:
            raise ValueError("needs at least one [start, stop) pair")
        for start, stop in spans:
            if not 0 <= start < stop:
                raise ValueError(f"needs 0 <= start < stop, got [{start}, {stop}]")
    return spans


class Region(_Model):
    """Where a generative expert's score counts: a box or a mask, in sample coordinates."""

    box: list[tuple[int, int]] | None = Field(
        None, description="[start, stop) per trailing dimension of the sample shape"
    )
    mask: TensorFile | None = Field(
        None, description="mask file: image (resized to the last two dims) or .safetensors"
    )

    @field_validator("box")
    @classmethod
    def _check_box(cls, box: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        return _check_spans(box)

    @model_validator(mode="after")
    def _one_of(self) -> Region:
        if (self.box is None) == (self.mask is None):
            raise ValueError("give exactly one of box or mask")
        return self

    @classmethod
    def of_box(cls, box: Sequence[tuple[int, int]]) -> Region:
        return cls(box=[tuple(b) for b in box])

    def to_tensor(self, sample_shape: Sequence[int]) -> torch.Tensor:
        """The mask, shape ``sample_shape``, values in [0, 1] (float32)."""
        shape = tuple(sample_shape)
        if self.box is not None:
            if len(self.box) > len(shape):
                raise ValueError(f"box: {len(self.box)} pairs for a sample of {len(shape)} dims")
            lead = len(shape) - len(self.box)
            mask = torch.zeros(shape)
            index = [slice(None)] * lead
            for (start, stop), size in zip(self.box, shape[lead:], strict=True):
                if stop > size:
                    raise ValueError(f"box: [{start}, {stop}) leaves a dimension of size {size}")
                index.append(slice(start, stop))
            mask[tuple(index)] = 1.0
            return mask
        assert self.mask is not None
        mask = self.mask.load().float()
        if self.mask.file.suffix.lower() in IMAGE_SUFFIXES:
            mask = _image_mask(self.mask, shape)
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask: values must lie in [0, 1]")
        try:
            return mask.expand(shape).contiguous()
        except RuntimeError:
            raise ValueError(f"mask: shape {list(mask.shape)} does not fit {list(shape)}") from None


def _image_mask(source: TensorFile, shape: tuple[int, ...]) -> torch.Tensor:
    """A grayscale image in [0, 1], resized (bilinear) to the sample's last two dims."""
    image = load_image(source.file, (0.0, 1.0), "L")  # (1, H, W)
    if len(shape) < 2:
        raise ValueError("mask: an image mask needs a sample of at least two dimensions")
    size = shape[-2:]
    if tuple(image.shape[-2:]) != size:
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0]
    return image[0].clamp(0, 1)


class Link(_Model):
    """This expert's condition tensor ``tensor`` := output ``output`` of ``source``'s Render."""

    tensor: str = Field(min_length=1)
    source: str = Field(min_length=1, description="a factor or source name")
    output: str = Field(min_length=1)


class _Endpoint(_Model):
    address: str | None = Field(None, description="host:port of an ExpertService")
    endpoint: str | None = Field(None, description="an expert name of the local stack")

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str | None) -> str | None:
        if address is not None and (":" not in address or address.startswith(":")):
            raise ValueError(f"expected host:port, got {address!r}")
        return address

    @model_validator(mode="after")
    def _one_of(self) -> _Endpoint:
        if (self.address is None) == (self.endpoint is None):
            raise ValueError("give exactly one of address or endpoint")
        return self

    def resolve_address(self, endpoints: Mapping[str, str] | None) -> str:
        if self.address is not None:
            return self.address
        if endpoints is None or self.endpoint not in endpoints:
            known = ", ".join(endpoints or {}) or "none (no stack given)"
            raise KeyError(f"no endpoint {self.endpoint!r} (known: {known})")
        return endpoints[self.endpoint]


class ExpertSpec(_Endpoint):
    """One factor of the product."""

    name: str | None = Field(None, description="factor name (traces, links); default: endpoint")
    weight: float = Field(1.0, description="exponent, reward scale or constraint scale")
    condition: ConditionSpec | None = None
    region: Region | None = None
    crop: list[tuple[int, int]] | None = Field(
        None,
        description="[start, stop) per trailing sample dimension: the expert sees only this "
        "window of each sample (a 16×16 prior at a box of a larger canvas)",
    )
    links: list[Link] = Field(default_factory=list)
    parents: dict[str, float] = Field(
        default_factory=dict,
        description="generative only: a conditional expert, its velocity pulled toward each "
        "named factor's with the weight given (its expert must answer VelocityVjp)",
    )

    @field_validator("parents")
    @classmethod
    def _check_parents(cls, parents: dict[str, float]) -> dict[str, float]:
        for name, pull in parents.items():
            if not name:
                raise ValueError("a parent needs a name")
            if not math.isfinite(pull) or pull <= 0:
                raise ValueError(f"the pull toward {name!r} must be finite and > 0, got {pull}")
        return parents

    @field_validator("crop")
    @classmethod
    def _check_crop(cls, crop: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        return _check_spans(crop)

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError("must be finite")
        return weight

    @property
    def label(self) -> str | None:
        return self.name or self.endpoint


class SourceSpec(_Endpoint):
    """An expert that only renders condition tensors for links."""

    name: str = Field(min_length=1)
    condition: ConditionSpec | None = None


class Settings(SamplerSettings):
    """The kernel's :class:`~poegen.kernel.spec.SamplerSettings` plus ``preset``; fields not
    given take the preset's values."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    preset_name: Literal["default", "paper"] = Field(
        "default", alias="preset", description="defaults of the fields not given"
    )

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (not ``preset``)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k != "preset_name"}

    def resolved(self) -> SamplerSettings:
        """The kernel's settings: the preset with the given fields applied."""
        return SamplerSettings.preset(self.preset_name, **self.given())


class OutputSpec(_Model):
    """What ``poegen generate`` writes."""

    decode: Literal["auto", "none"] = Field(
        "auto", description="decode particles with an AUTOENCODER expert, or keep them raw"
    )
    decoder: str | None = Field(None, description="factor name of the decoding expert")
    pixel_space: bool | None = Field(
        None, description="particles are pixels in [-1, 1] (default: 3- or 5-dim samples)"
    )
    samples: int = Field(8, ge=0, description="PNGs written, highest weight first; 0: all")
    fps: int = Field(8, ge=1, le=120, description="frames per second of videos")
    contact_sheet: bool = True


class GenerationSpec(_Model):
    """A generation job (see the module docstring)."""

    experts: list[ExpertSpec] = Field(min_length=1)
    sources: list[SourceSpec] = Field(default_factory=list)
    sample_shape: list[int] | None = Field(None, description="default: the experts' own")
    seed: int = Field(0, ge=0, lt=2**64)
    settings: Settings = Field(default_factory=Settings)
    preview: bool = False
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("sample_shape")
    @classmethod
    def _positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or any(s <= 0 for s in shape)):
            raise ValueError("needs positive dimensions")
        return shape

    @model_validator(mode="after")
    def _names(self) -> GenerationSpec:
        names = [e.label for e in self.experts] + [s.name for s in self.sources]
        seen: set[str] = set()
        for name in names:
            if name is not None and name in seen:
                raise ValueError(f"the name {name!r} is used twice among experts and sources")
            if name is not None:
                seen.add(name)
        for i, expert in enumerate(self.experts):
            for j, link in enumerate(expert.links):
                if link.source not in seen:
                    raise ValueError(
                        f"experts[{i}].links[{j}].source: no expert or source named {link.source!r}"
                    )
        return self

    @classmethod
    def from_file(cls, path: Path | str) -> GenerationSpec:
        """Read and validate a YAML/JSON spec (``SpecError`` naming the path)."""
        return load_model_file(cls, path)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "spec"
    ) -> GenerationSpec:
        return validate_model(cls, data, source=source, base_dir=base_dir)

    def total_levels(self) -> int | None:
        """Levels the job will report (None when the grid comes from an expert)."""
        from poegen.kernel.schedule import sigmas_for

        settings = self.settings.resolved()
        if settings.schedule == "expert" and settings.sigmas is None:
            return settings.num_steps - 1
        try:
            return sum(1 for s in sigmas_for(settings).tolist() if s > 0) - 1
        except (ValueError, TypeError):
            return None


class SpecBuilder:
    """A small builder of :class:`GenerationSpec` (see the module docstring)."""

    def __init__(self, *, seed: int = 0, sample_shape: Sequence[int] | None = None) -> None:
        self._data: dict[str, Any] = {"seed": seed, "experts": [], "sources": []}
        if sample_shape is not None:
            self._data["sample_shape"] = list(sample_shape)

    def expert(
        self,
        address: str | None = None,
        *,
        endpoint: str | None = None,
        name: str | None = None,
        weight: float = 1.0,
        text: str = "",
        negative_text: str = "",
        tensors: Mapping[str, Any] | None = None,
        scalars: Mapping[str, float] | None = None,
        region: Region | Mapping[str, Any] | None = None,
        links: Sequence[Mapping[str, str] | Link] = (),
        crop: Sequence[tuple[int, int]] | None = None,
        parents: Mapping[str, float] | None = None,
    ) -> SpecBuilder:
        entry: dict[str, Any] = {"address": address, "endpoint": endpoint, "weight": weight}
        if name is not None:
            entry["name"] = name
        if text or negative_text or tensors or scalars:
            entry["condition"] = {
                "text": text,
                "negative_text": negative_text,
                "tensors": dict(tensors or {}),
                "scalars": dict(scalars or {}),
            }
        if region is not None:
            entry["region"] = region
        if crop is not None:
            entry["crop"] = [tuple(span) for span in crop]
        if links:
            entry["links"] = list(links)
        if parents:
            entry["parents"] = dict(parents)
        self._data["experts"].append(entry)
        return self

    def source(
        self, name: str, address: str | None = None, *, endpoint: str | None = None, text: str = ""
    ) -> SpecBuilder:
        entry: dict[str, Any] = {"name": name, "address": address, "endpoint": endpoint}
        if text:
            entry["condition"] = {"text": text}
        self._data["sources"].append(entry)
        return self

    def settings(self, **values: Any) -> SpecBuilder:
        self._data.setdefault("settings", {}).update(values)
        return self

    def shape(self, *sample_shape: int) -> SpecBuilder:
        self._data["sample_shape"] = list(sample_shape)
        return self

    def output(self, **values: Any) -> SpecBuilder:
        self._data.setdefault("output", {}).update(values)
        return self

    def preview(self, on: bool = True) -> SpecBuilder:
        self._data["preview"] = on
        return self

    def build(self) -> GenerationSpec:
        return GenerationSpec.from_mapping(self._data, source="spec")


# --------------------------------------------------------------------------- wire


def settings_to_proto(settings: Settings) -> sampler_pb2.SamplerSettings:
    """The wire's settings: the preset and only the fields given (the service fills in)."""
    msg = sampler_pb2.SamplerSettings(preset=settings.preset_name)
    for name, value in settings.given().items():
        if value is None:
            if name == "max_batch":
                msg.max_batch = 0
            continue
        if name == "sigmas":
            msg.sigmas.extend(value)
        else:
            setattr(msg, name, value)
    return msg


def to_request(
    spec: GenerationSpec,
    sample_shape: Sequence[int],
    endpoints: Mapping[str, str] | None = None,
) -> sampler_pb2.GenerateRequest:
    """The ``GenerateRequest`` of ``spec`` (files loaded, endpoint names resolved)."""
    factors = []
    for i, expert in enumerate(spec.experts):
        where = f"experts[{i}]"
        factor = sampler_pb2.FactorSpec(
            address=address_of(expert, endpoints, where), weight=expert.weight
        )
        if expert.label:
            factor.name = expert.label
        if expert.condition is not None and not expert.condition.is_empty():
            factor.condition.CopyFrom(_checked(expert.condition.to_proto, f"{where}.condition"))
        if expert.region is not None:
            mask = _checked(lambda e=expert: e.region.to_tensor(sample_shape), f"{where}.region")
            factor.region.CopyFrom(codec.encode(mask))
        for start, stop in expert.crop or ():
            factor.crop.add(start=start, stop=stop)
        for link in expert.links:
            factor.links.add(tensor=link.tensor, source=link.source, output=link.output)
        factor.parents.update(expert.parents)
        factors.append(factor)
    sources = []
    for j, source in enumerate(spec.sources):
        where = f"sources[{j}]"
        msg = sampler_pb2.ConditionSource(
            name=source.name, address=address_of(source, endpoints, where)
        )
        if source.condition is not None:
            msg.condition.CopyFrom(_checked(source.condition.to_proto, f"{where}.condition"))
        sources.append(msg)
    return sampler_pb2.GenerateRequest(
        factors=factors,
        sources=sources,
        sample_shape=list(sample_shape),
        settings=settings_to_proto(spec.settings),
        seed=spec.seed,
        preview=spec.preview,
    )


def address_of(entry: _Endpoint, endpoints: Mapping[str, str] | None, where: str) -> str:
    """The address of an expert or source of a spec; ``SpecError`` naming ``where``."""
    try:
        return entry.resolve_address(endpoints)
    except KeyError as e:
        from poegen.clients.files import SpecError

        raise SpecError("spec", [(f"{where}.endpoint", str(e.args[0]))]) from None


def _checked(load: Any, where: str) -> Any:
    """Run a loader; its ValueError/OSError becomes a SpecError naming ``where``."""
    from poegen.clients.files import SpecError

    try:
        return load()
    except (ValueError, OSError) as e:
        raise SpecError("spec", [(where, str(e))]) from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of spec files (draft 2020-12), for editors."""
    schema = GenerationSpec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "poegen generation spec"
    return schema


__all__ = [
    "ConditionSpec",
    "ExpertSpec",
    "GenerationSpec",
    "Link",
    "OutputSpec",
    "Region",
    "Settings",
    "SourceSpec",
    "SpecBuilder",
    "TensorFile",
    "address_of",
    "json_schema",
    "load_image",
    "settings_to_proto",
    "to_request",
]
