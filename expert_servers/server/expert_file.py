"""Experts described by a YAML file, built through the ``poegen.experts`` registry.

The file names a registered expert (an entry point of the group ``poegen.experts``, see
:func:`poegen.kernel.experts.create_expert`) and its keyword parameters::

    expert: gaussian_mixture
    params:
      means: [[-2.0, 0.0], [2.0, 0.0]]
      covariances: [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]
      weights: [0.5, 0.5]
    max_batch: 256            # optional: the largest batch one call may carry
    latent_space: toy-2d      # optional: name of the latent space

``poegen serve analytic --config FILE`` serves such a file, and :class:`ExpertFileAdapter`
loads such files as ``LoadModel`` ids under the model root, which makes hot swap testable with
real analytic experts. Files are parsed with ``yaml.safe_load`` only; no code is named by a
file beyond the installed entry points.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from poegen.expert_servers.server.adapter import ModelRef, Progress, ServedModel
from poegen.expert_servers.server.config import ConfigError, format_validation_error, read_yaml
from poegen.kernel.experts import create_expert
from poegen.kernel.refusal import ExpertError

_SUFFIXES = (".yaml", ".yml")


class ExpertFile(BaseModel):
    """The expert part of a YAML file (other top-level keys, like ``server``, are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    expert: str = Field(min_length=1, description="entry-point name in group poegen.experts")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")
    max_batch: int | None = Field(None, ge=1, description="largest batch per call")
    latent_space: str = Field("", description="name of the latent space")


def parse_expert_file(data: Mapping[str, Any]) -> ExpertFile:
    """Validate a mapping; ``ConfigError`` names the field on failure."""
    try:
        return ExpertFile.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def build_expert(spec: ExpertFile) -> ServedModel:
    """Build the expert a file describes."""
    expert = create_expert(spec.expert, **spec.params)
    return ServedModel(expert, latent_space=spec.latent_space, max_batch=spec.max_batch)


def load_expert_file(path: Path | str) -> ServedModel:
    """Read, validate and build an expert file (raises ``ConfigError``/``ValueError``)."""
    return build_expert(parse_expert_file(read_yaml(path, field="expert file")))


class ExpertFileAdapter:
    """Loads ``LoadModel`` ids that are expert YAML files under the model root."""

    def load(self, ref: ModelRef, options: Mapping[str, str], progress: Progress) -> ServedModel:
        if options:
            raise ExpertError.invalid("options", "expert files take no options")
        if ref.path is None or ref.path.suffix not in _SUFFIXES or not ref.path.is_file():
            raise ExpertError.invalid("model_id", f"{ref.model_id!r} is not a .yaml expert file")
        try:
            spec = parse_expert_file(read_yaml(ref.path, field="expert file"))
        except ConfigError as e:
            # read_yaml names the file in its message: answer with the id only
            raise ExpertError.invalid(
                "model_id", f"{ref.model_id!r}: {_without(e, ref.path)}"
            ) from None
        progress(0.5, f"building {spec.expert}")
        try:
            return build_expert(spec)
        except (TypeError, ValueError) as e:
            raise ExpertError.invalid(
                "model_id", f"{ref.model_id!r}: cannot build {spec.expert!r} ({type(e).__name__})"
            ) from None


def _without(error: Exception, path: Path) -> str:
    return str(error).replace(str(path), "<file>")
