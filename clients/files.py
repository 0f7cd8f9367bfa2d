"""Reading the user's YAML/JSON files into pydantic models, with errors that name the path.

Every file the CLI and the SDK read (a generation spec, a stack file) goes through
:func:`load_model_file`::

    spec = load_model_file(GenerationSpec, "spec.yaml")

A file that fails validation raises :class:`SpecError` whose message names the file and the
exact path inside it, the way an editor would point at it::

    spec.yaml: experts[2].region.box: Value error, needs [start, stop) with start < stop

Files are parsed with ``yaml.safe_load`` (JSON is YAML, so ``.json`` files read the same) and
at most :data:`MAX_FILE_BYTES`; relative paths inside a file are resolved against the file's
own folder by the models that hold them (they receive ``base_dir`` through the validation
context).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

MAX_FILE_BYTES = 4 << 20

_M = TypeVar("_M", bound=BaseModel)


class SpecError(ValueError):
    """An invalid spec or stack file; the message names the file and the field's path."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = tuple(problems)
        text = "; ".join(f"{path}: {message}" if path else message for path, message in problems)
        super().__init__(f"{source}: {text}" if source else text)

    @property
    def paths(self) -> tuple[str, ...]:
        """The failing fields' paths, e.g. ``("experts[2].region.box",)``."""
        return tuple(path for path, _ in self.problems)


def format_loc(loc: Sequence[int | str]) -> str:
    """``("experts", 2, "region", "box")`` → ``"experts[2].region.box"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part in ("tagged-union",):
            continue  # pydantic's names for validators and unions, not fields of the file
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_of(error: ValidationError) -> list[tuple[str, str]]:
    """(path, message) per problem of a pydantic error."""
    return [
        (format_loc(item["loc"]), item["msg"])
        for item in error.errors(include_input=False, include_url=False)
    ]


def read_mapping(path: Path | str) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path`` (``SpecError`` naming the file otherwise)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecError(str(path), [("", f"cannot read: {e.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(str(path), [("", f"larger than {MAX_FILE_BYTES} bytes")])
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise SpecError(str(path), [("", f"not valid YAML/JSON{at}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(str(path), [("", f"must be a mapping, got {type(data).__name__}")])
    return data


def validate_model(
    model: type[_M], data: Mapping[str, Any], *, source: str = "", base_dir: Path | None = None
) -> _M:
    """``model`` validated from ``data``; ``SpecError`` naming each failing path otherwise."""
    try:
        return model.model_validate(dict(data), context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as e:
        raise SpecError(source, problems_of(e)) from None


def load_model_file(model: type[_M], path: Path | str) -> _M:
    """Read and validate a YAML/JSON file; relative paths in it resolve against its folder."""
    path = Path(path)
    return validate_model(
        model, read_mapping(path), source=str(path), base_dir=path.resolve().parent
    )


def resolve(path: Path | str, info_context: Mapping[str, Any] | None) -> Path:
    """``path`` made absolute against the validation context's ``base_dir`` (or the cwd)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = (info_context or {}).get("base_dir") or Path.cwd()
    return Path(base) / path


__all__ = [
    "MAX_FILE_BYTES",
    "SpecError",
    "format_loc",
    "load_model_file",
    "problems_of",
    "read_mapping",
    "resolve",
    "validate_model",
]
