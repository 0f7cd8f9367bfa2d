"""``poegen serve BACKEND``: run an expert host until SIGTERM/SIGINT.

::

    poegen serve analytic --config expert.yaml [--host H] [--port N] [--metrics-port N]
                          [--model-root DIR] [--grace S] [--batch-delay-ms MS]
    poegen serve flux --model /models/flux-tiny [--option dtype=float32 ...] [--model-root DIR]
    poegen serve BACKEND --model org/model-id --model-root /models   (an id the adapter resolves)

``BACKEND`` is any name of the entry-point group ``poegen.backends``
(:mod:`poegen.expert_servers.server.backends`); an unknown name is a usage error (status 2)
listing the installed ones.

``--config`` is a YAML file with the host settings under ``server:`` (see
:mod:`poegen.expert_servers.server.config`); for ``analytic`` it may also name the expert::

    expert: gaussian_mixture          # an entry point of group poegen.experts
    params: {means: [[-2, 0], [2, 0]], covariances: [...], weights: [0.5, 0.5]}
    max_batch: 256
    latent_space: toy-2d
    server: {port: 0, model_root: experts/, grace_s: 10}

``--model ID`` loads a model at start through the host's normal ``LoadModel`` path (the same
id checks, revision and health as a later hot swap): an existing folder or file is served
under its name with the model root set to its parent (unless ``--model-root`` is given, which
must contain it); anything else is taken as an id the adapter resolves itself (a hub id in
the local cache) and allowlisted. ``--option key=value`` (repeatable) are the adapter's load
options. Health is NOT_SERVING until the load is done; a failed load stops the host with
status 1.

Flags override the ``server:`` section; the tokens come from ``POEGEN_TOKEN`` and
``POEGEN_ADMIN_TOKEN`` when set. Once listening it prints ``poegen: serving BACKEND on
HOST:PORT`` (and ``poegen: metrics on HOST:PORT``) on stdout; with ``--port 0`` that line
holds the port picked. Exit status: 0 after a clean shutdown, 1 when the initial load failed,
2 for an invalid configuration.

When ``POEGEN_PARENT_PID`` is set (a :class:`poegen.clients.stack.LocalStack` sets it), the
process stops itself once that parent is gone (:func:`stop_with_parent`). After a clean
shutdown the process exits at once, skipping the interpreter's slow teardown (:func:`exit_now`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from poegen.expert_servers.server.adapter import ModelAdapter
from poegen.expert_servers.server.backends import (
    UnknownBackendError,
    backend_names,
    create_adapter,
)
from poegen.expert_servers.server.config import (
    ConfigError,
    ServerConfig,
    parse_server_config,
    read_yaml,
)
from poegen.expert_servers.server.expert_file import build_expert, parse_expert_file
from poegen.expert_servers.server.server import create_server, serve
from poegen.kernel.refusal import ExpertError
from poegen.kernel.transport import format_address, tune_allocator

logger = logging.getLogger(__name__)

_ENV_TOKENS = {"token": "POEGEN_TOKEN", "admin_token": "POEGEN_ADMIN_TOKEN"}
PARENT_ENV = "POEGEN_PARENT_PID"


def _announce(line: str) -> None:
    print(line, flush=True)


def stop_with_parent(poll_s: float = 0.5) -> None:
    """Send ourselves SIGTERM once the process ``$POEGEN_PARENT_PID`` is no longer our parent.

    A no-op without the variable. Runs a daemon thread; the host's SIGTERM handler then
    drains and exits as usual.
    """
    expected = os.environ.get(PARENT_ENV, "")
    if not expected.isdigit():
        return
    parent = int(expected)

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        logger.warning("parent process %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() == parent:
        threading.Thread(target=watch, name="poegen-parent-watch", daemon=True).start()


@dataclass(frozen=True, slots=True)
class ServeRequest:
    """The flags of ``poegen serve`` (``None``: not given)."""

    backend: str
    config: Path | None = None
    model: str | None = None
    options: tuple[str, ...] = ()
    host: str | None = None
    port: int | None = None
    metrics_port: int | None = None
    model_root: Path | None = None
    grace_s: float | None = None
    batch_delay_ms: float | None = None


def server_settings(request: ServeRequest, data: dict[str, Any]) -> dict[str, Any]:
    """The ``server:`` section of ``data`` with the flags and token variables applied."""
    settings = dict(data.get("server") or {})
    for key in ("host", "port", "metrics_port", "model_root", "grace_s", "batch_delay_ms"):
        value = getattr(request, key)
        if value is not None:
            settings[key] = value
    for key, variable in _ENV_TOKENS.items():
        if variable in os.environ:  # set but empty is refused by the config, not auth off
            settings[key] = os.environ[variable]
    return settings


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["dtype=float32", "variant=fp16"]`` → a dict; ``ConfigError`` on a pair without ``=``."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option: expected key=value, got {pair!r}")
        options[key.strip()] = value
    return options


def model_location(model: str, model_root: Path | None) -> tuple[str, Path | None, tuple[str, ...]]:
    """(model id, model root, allowlist) for ``--model``; see the module docstring."""
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        root = model_root.resolve() if model_root is not None else path.parent
        if not path.is_relative_to(root) or path == root:
            raise ConfigError(f"--model: {model} is not inside --model-root {model_root}")
        return path.relative_to(root).as_posix(), root, ()
    return model, model_root, (model,)


@dataclass(frozen=True, slots=True)
class ServePlan:
    """What to run: the host's config, the adapter, and what it serves from the start."""

    config: ServerConfig
    adapter: ModelAdapter
    expert: Any = None  # a ServedModel built from an analytic --config
    model_id: str | None = None  # loaded through LoadModel at start
    options: dict[str, str] | None = None


def plan(request: ServeRequest) -> ServePlan:
    """Validate the flags into a :class:`ServePlan` (``ConfigError``/``ValueError`` naming the
    field, :class:`UnknownBackendError` for an unknown backend)."""
    adapter = create_adapter(request.backend)
    data = read_yaml(request.config) if request.config is not None else {}
    settings = server_settings(request, data)
    options = parse_options(request.options)
    expert, model_id = None, None
    if request.model is not None:
        root = Path(settings["model_root"]) if settings.get("model_root") else None
        model_id, root, allowlist = model_location(request.model, root)
        settings["model_root"] = root
        settings["allowlist"] = (*settings.get("allowlist", ()), *allowlist)
    config = parse_server_config(settings)
    if request.backend == "analytic" and "expert" in data:
        if request.model is not None:
            raise ConfigError("--model: the config already names an expert")
        if options:
            raise ConfigError("--option: an expert named by --config takes no options")
        expert = build_expert(parse_expert_file(data))
    return ServePlan(config, adapter, expert, model_id, options)


def run_serve(request: ServeRequest) -> int:
    """Run ``poegen serve`` (blocks until SIGTERM/SIGINT); the exit status."""
    try:
        served = plan(request)
    except UnknownBackendError:
        raise
    except (ConfigError, TypeError, ValueError) as e:
        print(f"poegen serve: error: {e}", file=sys.stderr)
        return 2
    stop_with_parent()
    if served.model_id is None:
        return asyncio.run(
            serve(
                served.config,
                adapter=served.adapter,
                expert=served.expert,
                model_id="analytic",
                name=request.backend,
                announce=_announce,
            )
        )
    return asyncio.run(
        serve_model(
            served.config,
            served.adapter,
            served.model_id,
            served.options or {},
            name=request.backend,
            announce=_announce,
        )
    )


async def serve_model(
    config: ServerConfig,
    adapter: ModelAdapter,
    model_id: str,
    options: dict[str, str],
    *,
    name: str,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Like :func:`poegen.expert_servers.server.server.serve`, loading ``model_id`` at start
    through ``LoadModel``'s path; 1 when that load fails."""
    tune_allocator()  # a process entry point: see poegen.kernel.transport
    host, port = create_server(config, adapter=adapter)
    await host.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    try:
        if announce is not None:
            announce(f"poegen: serving {name} on {format_address(config.host, port)}")
            if host.metrics_port is not None:
                announce(
                    f"poegen: metrics on {format_address(config.metrics_host, host.metrics_port)}"
                )
        load = asyncio.ensure_future(_load(host, model_id, options))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            error = load.exception()
            reason = error.reason if isinstance(error, ExpertError) else repr(error)
            print(f"poegen serve: error: loading {model_id!r} failed: {reason}", file=sys.stderr)
            status = 1
        else:
            await stopping
        load.cancel()
        stopping.cancel()
        logger.info("shutting down: draining in-flight calls for up to %.1f s", config.grace_s)
        await host.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return status


async def _load(host: Any, model_id: str, options: dict[str, str]) -> None:
    async for event in host.models.load(model_id, options):
        logger.info("load %s: %3.0f%% %s", event.stage, 100 * event.progress, event.message)


def exit_now(status: int) -> NoReturn:
    """End a server process that has drained and stopped: flush, then ``os._exit``.

    The host is stopped by then (calls drained, shared memory closed); what is left is the
    interpreter's teardown of torch, diffusers and gRPC, which takes seconds (3 s measured
    for a flow expert, more on a loaded machine) and finalizes nothing of ours. A stack
    stopping several servers waits for that, so the servers skip it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --------------------------------------------------------------------------- typer


def _complete_backend(incomplete: str) -> list[str]:
    return [name for name in backend_names() if name.startswith(incomplete)]


def serve_command(
    backend: Annotated[
        str,
        typer.Argument(
            help="backend name (entry point of group poegen.backends)",
            autocompletion=_complete_backend,
            show_default=False,
        ),
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML file: server: section (+ expert: for analytic)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="model folder/file or hub id, loaded at start")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="adapter load option key=value (repeatable)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[
        int | None, typer.Option(help="bind port; 0 picks a free one and prints it")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics on this port")] = None,
    model_root: Annotated[
        Path | None, typer.Option(help="LoadModel ids are paths under it")
    ] = None,
    grace: Annotated[float | None, typer.Option(help="drain time on shutdown (s)")] = None,
    batch_delay_ms: Annotated[
        float | None,
        typer.Option(help="merge concurrent calls; the most one waits for others (ms); 0: off"),
    ] = None,
) -> int:
    """Serve an expert over gRPC until SIGTERM or Ctrl-C.

    Example: [bold]poegen serve analytic --config examples/experts/ring.yaml --port 0[/bold]
    (or: poegen serve flux --model /models/flux-tiny --option dtype=float32)
    """
    request = ServeRequest(
        backend,
        config,
        model,
        tuple(option or ()),
        host,
        port,
        metrics_port,
        model_root,
        grace,
        batch_delay_ms,
    )
    try:
        status = run_serve(request)
    except UnknownBackendError as e:
        raise typer.BadParameter(str(e), param_hint="BACKEND") from None
    if status == 2:
        return status  # nothing was served: an ordinary return (tests call the CLI in-process)
    exit_now(status)


def register(app: typer.Typer) -> None:
    """Add ``poegen serve`` to the CLI."""
    app.command("serve", help=serve_command.__doc__, no_args_is_help=True)(serve_command)


__all__ = [
    "PARENT_ENV",
    "ServePlan",
    "ServeRequest",
    "exit_now",
    "model_location",
    "parse_options",
    "plan",
    "register",
    "run_serve",
    "serve_command",
    "serve_model",
    "server_settings",
    "stop_with_parent",
]
