"""Scene and mesh files, read only from a configured asset root.

A name is a relative POSIX path (``"scenes/drop.yaml"``, ``"meshes/cube.obj"``) resolved inside
the root. Refused, each with an :class:`~poegen.kernel.refusal.ExpertError` (INVALID_ARGUMENT)
naming the field: absolute paths, ``..`` components, URLs (anything with ``://`` or a scheme
such as ``file:``), backslashes, names whose resolved path (symlinks followed) leaves the root,
names with a suffix outside the allowed set, missing files, and files larger than the limit.
Messages echo the name as given, never the server path of the root.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from poegen.kernel.refusal import ExpertError

MAX_ASSET_BYTES = 64 << 20
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def resolve_asset(
    root: Path,
    name: str,
    *,
    field: str,
    suffixes: Iterable[str],
    max_bytes: int = MAX_ASSET_BYTES,
) -> Path:
    """The file ``name`` inside ``root`` (see the module docstring for what is refused)."""
    allowed = tuple(s.lower() for s in suffixes)
    if not isinstance(name, str) or not name.strip():
        raise ExpertError.invalid(field, "an asset name is required")
    if "://" in name or _SCHEME.match(name) or "\\" in name or "\x00" in name:
        raise ExpertError.invalid(field, f"{name!r}: only names of files under the asset root")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ExpertError.invalid(field, f"{name!r}: must be relative, without '..'")
    if rel.suffix.lower() not in allowed:
        raise ExpertError.invalid(field, f"{name!r}: expected one of {', '.join(allowed)}")
    root = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ExpertError.invalid(field, f"{name!r}: leaves the asset root")
    if not path.is_file():
        raise ExpertError.invalid(field, f"{name!r}: no such file under the asset root")
    if path.stat().st_size > max_bytes:
        raise ExpertError.resource_exhausted(field, f"{name!r}: larger than {max_bytes} bytes")
    return path
