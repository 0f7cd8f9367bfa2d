"""Reading ``LoadModel`` options (a string → string map) with errors naming the option.

::

    read = OptionReader(options)
    batch = read.integer("max_batch", 8, minimum=1)
    read.finish()          # INVALID_ARGUMENT on options[<name>] for any option not read
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from poegen.kernel.refusal import ExpertError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OptionReader:
    """Typed reads of an options map; remembers which keys were read."""

    def __init__(self, options: Mapping[str, str]) -> None:
        self._options = dict(options)
        self._read: set[str] = set()

    def text(self, key: str, default: str = "") -> str:
        self._read.add(key)
        return self._options.get(key, default).strip()

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise ExpertError.invalid(f"options[{key}]", f"{value!r} is not one of {list(choices)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        raw = self.text(key, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ExpertError.invalid(f"options[{key}]", f"{raw!r} is not an integer") from None
        if value < minimum:
            raise ExpertError.invalid(f"options[{key}]", f"must be ≥ {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float) -> float:
        raw = self.text(key, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ExpertError.invalid(f"options[{key}]", f"{raw!r} is not a number") from None
        if not math.isfinite(value) or value < minimum:
            raise ExpertError.invalid(f"options[{key}]", f"must be finite and ≥ {minimum}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.choice(key, "true" if default else "false", ("true", "false", "1", "0"))
        return value in ("true", "1")

    def dtype(self, key: str = "dtype", default: str = "float32") -> torch.dtype:
        return DTYPES[self.choice(key, default, tuple(DTYPES))]

    def device(self, key: str = "device", default: str = "cpu") -> torch.device:
        raw = self.text(key, default)
        try:
            return torch.device(raw)
        except (RuntimeError, ValueError):
            raise ExpertError.invalid(f"options[{key}]", f"{raw!r} is not a torch device") from None

    def finish(self) -> None:
        """Refuse options nobody read."""
        unknown = sorted(set(self._options) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise ExpertError.invalid(f"options[{unknown[0]}]", f"unknown option (known: {known})")
