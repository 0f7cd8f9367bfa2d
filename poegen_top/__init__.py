"""poegen: training-free product-of-experts sampling for visual generation.

The user-facing names, re-exported from :mod:`poegen.clients` (imported lazily, so
``import poegen.kernel`` stays as light as the kernel)::

    from poegen import Client, AsyncClient, SpecBuilder, GenerationSpec, LocalStack

    with LocalStack.from_yaml("examples/t1_stack.yaml") as stack, Client.from_stack(stack) as c:
        result = c.generate(GenerationSpec.from_file("examples/t1.yaml"))

Subpackages: :mod:`poegen.kernel` (the sampler), :mod:`poegen.v1` (the wire),
:mod:`poegen.expert_servers` (expert hosts and adapters), :mod:`poegen.clients` (SDK and
CLI), :mod:`poegen.bench` (benchmarks).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncClient": "poegen.clients.sdk",
    "ClientTLS": "poegen.clients.endpoints",
    "Client": "poegen.clients.sdk",
    "GenerationResult": "poegen.clients.sdk",
    "JobInfo": "poegen.clients.sdk",
    "ProgressEvent": "poegen.clients.sdk",
    "GenerationSpec": "poegen.clients.spec",
    "SpecBuilder": "poegen.clients.spec",
    "Region": "poegen.clients.spec",
    "LocalStack": "poegen.clients.stack",
    "StackConfig": "poegen.clients.stack",
    "PoegenError": "poegen.clients.errors",
    "GenerationError": "poegen.clients.errors",
    "GenerationTimeout": "poegen.clients.errors",
    "SpecError": "poegen.clients.files",
    "write_outputs": "poegen.clients.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'poegen' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
