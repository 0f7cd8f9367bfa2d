"""The SDK's exceptions: one base class, a few kinds a Python user catches by type.

* :class:`PoegenError`: base of everything the SDK raises on purpose.
* :class:`GenerationError`: a job failed on the server side (or in the in-process kernel):
  ``.code`` (a ``grpc.StatusCode``), ``.field`` (the request path it names, e.g.
  ``"factors[1].address"``, mapped back to the spec's ``"experts[1].address"`` in
  ``.spec_field``) and ``.reason``.
* :class:`GenerationTimeout`: the job ran past the ``timeout`` given (also a
  :class:`TimeoutError`); the server-side job was cancelled.
* :class:`ConnectionFailed`: an endpoint could not be reached.
* :class:`CLIError`: a failure the CLI reports in one line with its exit status.

Cancellation is not an error class: ``KeyboardInterrupt`` and ``asyncio.CancelledError``
propagate unchanged after the server-side job was cancelled.
"""

from __future__ import annotations

import re

import grpc

_FACTOR = re.compile(r"^factors\[(\d+)\]")


class PoegenError(Exception):
    """Base of the SDK's errors."""


class ConnectionFailed(PoegenError):
    """An endpoint could not be reached."""


class GenerationError(PoegenError):
    """A job failed; ``code``, ``field`` (request path) and ``reason``."""

    def __init__(self, code: grpc.StatusCode, field: str, reason: str, *, where: str = "") -> None:
        self.code = code
        self.field = field
        self.reason = reason
        self.where = where
        self.spec_field = spec_field(field)
        at = f" ({where})" if where else ""
        name = f"{self.spec_field}: " if self.spec_field else ""
        super().__init__(f"{code.name}{at}: {name}{reason}")


class GenerationTimeout(PoegenError, TimeoutError):
    """The job ran past its timeout; the server-side job was cancelled."""


class CLIError(PoegenError):
    """A failure the CLI reports as one line, with ``exit_code`` (1: failure, 2: usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def spec_field(field: str) -> str:
    """A request path in the spec's words: ``factors[2].region`` → ``experts[2].region``."""
    return _FACTOR.sub(lambda m: f"experts[{m.group(1)}]", field)


__all__ = [
    "CLIError",
    "ConnectionFailed",
    "GenerationError",
    "GenerationTimeout",
    "PoegenError",
    "spec_field",
]
