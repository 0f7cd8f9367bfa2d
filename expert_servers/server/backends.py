"""The backends of ``poegen serve NAME``: model adapters registered as entry points.

A backend is a :class:`~poegen.expert_servers.server.adapter.ModelAdapter` class built with no
arguments, registered in the entry-point group ``poegen.backends``::

    [project.entry-points."poegen.backends"]
    analytic = "poegen.expert_servers.server.expert_file:ExpertFileAdapter"
    flux = "poegen.expert_servers.flow:FluxAdapter"
    my_model = "my_package.adapter:MyAdapter"        # a third-party family

``poegen serve my_model --model /models/my-model`` then loads ``my-model`` through the host's
``LoadModel`` path with that adapter. Lookups read the installed distributions each time
(nothing is cached at import); an unknown name raises :class:`UnknownBackendError`, a
``ValueError`` listing the installed names.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from poegen.expert_servers.server.adapter import ModelAdapter

ENTRY_POINT_GROUP = "poegen.backends"


class UnknownBackendError(ValueError):
    """No backend of that name is installed; the message lists those that are."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """The installed backends' names, sorted."""
    return sorted(_entry_points())


def backend_class(name: str) -> type[ModelAdapter]:
    """The adapter class registered as ``name`` (imports its module)."""
    found = _entry_points().get(name)
    if found is None:
        installed = ", ".join(backend_names()) or "none"
        raise UnknownBackendError(f"unknown backend {name!r} (installed: {installed})")
    return found.load()


def create_adapter(name: str) -> ModelAdapter:
    """A new adapter of backend ``name``."""
    return backend_class(name)()


__all__ = [
    "ENTRY_POINT_GROUP",
    "UnknownBackendError",
    "backend_class",
    "backend_names",
    "create_adapter",
]
