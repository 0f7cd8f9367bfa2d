"""``poegen sampler``: run the kernel as a gRPC ``SamplerService`` until SIGTERM/SIGINT.

::

    poegen sampler [--config FILE] [--host H] [--port N] [--max-jobs N] [--grace S]
                   [--allow-expert HOST:PORT ...] [--shared-memory] [--job-store DIR|memory]

``--config`` is a YAML file whose ``sampler:`` section holds
:class:`poegen.kernel.service.SamplerServerConfig`::

    sampler:
      host: 127.0.0.1
      port: 50050
      max_jobs: 4
      allowed_experts: [127.0.0.1:50051, 127.0.0.1:50052]
      expert_deadline_s: 60
      expert_retries: 5

Flags override the file. The job store (requests, per-level checkpoints, results; a Sampler
restarted on it resumes its unfinished jobs, see :mod:`poegen.kernel.jobs`) is, in order:
``--job-store``, the ``job_store`` of the file, ``POEGEN_JOB_STORE``, and else
``$XDG_STATE_HOME/poegen/sampler-<port>`` (``~/.local/state/...``) for a fixed port; ``memory``
(and port 0, whose address a restart cannot keep) keeps jobs in memory only.
Tokens come from the environment: ``POEGEN_TOKEN`` (the bearer token
clients of the sampler must present) and ``POEGEN_EXPERT_TOKEN`` (the one the sampler presents
to the experts). Once listening it prints ``poegen: serving sampler on HOST:PORT`` on
stdout (the line format of ``poegen serve``).
Exit status: 0 after a clean shutdown, 2 for an invalid configuration or a job store in use.

Registered in the ``poegen`` CLI by :func:`register`; also runnable as
``python -m poegen.clients.sampler_cli [flags]``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from poegen.expert_servers.server.cli import exit_now, stop_with_parent
from poegen.expert_servers.server.config import ConfigError, format_validation_error, read_yaml
from poegen.kernel.jobs import JobStoreError
from poegen.kernel.service import SamplerServerConfig, serve_sampler

_ENV_TOKENS = {"token": "POEGEN_TOKEN", "expert_token": "POEGEN_EXPERT_TOKEN"}


def _announce(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True, slots=True)
class SamplerFlags:
    """The flags of ``poegen sampler`` (``None``: not given)."""

    config: Path | None = None
    host: str | None = None
    port: int | None = None
    max_jobs: int | None = None
    grace_s: float | None = None
    allowed_experts: tuple[str, ...] = ()
    shared_memory: bool = False
    job_store: str | None = None


def sampler_config(flags: SamplerFlags) -> SamplerServerConfig:
    """The ``sampler:`` section of ``--config`` with flags and token variables applied."""
    data = read_yaml(flags.config) if flags.config is not None else {}
    settings: dict[str, Any] = dict(data.get("sampler") or {})
    for key in ("host", "port", "max_jobs", "grace_s"):
        value = getattr(flags, key)
        if value is not None:
            settings[key] = value
    if flags.allowed_experts:
        settings["allowed_experts"] = tuple(flags.allowed_experts)
    if flags.shared_memory:
        settings["shared_memory"] = True
    for key, variable in _ENV_TOKENS.items():
        if variable in os.environ:  # set but empty is refused by the config, not auth off
            settings[key] = os.environ[variable]
    store = flags.job_store or settings.get("job_store") or os.environ.get("POEGEN_JOB_STORE")
    if store is None and settings.get("port"):
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        store = str(state / "poegen" / f"sampler-{settings['port']}")
    settings["job_store"] = None if store in (None, "memory") else store
    try:
        return SamplerServerConfig.model_validate(settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "sampler")) from None


def run(flags: SamplerFlags) -> int:
    try:
        config = sampler_config(flags)
    except (ConfigError, ValueError) as e:
        print(f"poegen sampler: error: {e}", file=sys.stderr)
        return 2
    stop_with_parent()
    try:
        return asyncio.run(serve_sampler(config, announce=_announce))
    except JobStoreError as e:  # another Sampler holds the store
        print(f"poegen sampler: error: {e}", file=sys.stderr)
        return 2


def sampler_command(
    config: Annotated[Path | None, typer.Option(help="YAML file with a sampler: section")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[
        int | None, typer.Option(help="bind port; 0 picks a free one and prints it")
    ] = None,
    max_jobs: Annotated[int | None, typer.Option(help="jobs running at once")] = None,
    grace: Annotated[float | None, typer.Option(help="shutdown grace (s)")] = None,
    allow_expert: Annotated[
        list[str] | None,
        typer.Option(metavar="HOST:PORT", help="an expert address requests may name (repeat)"),
    ] = None,
    shared_memory: Annotated[
        bool, typer.Option(help="shared-memory tensors to local experts")
    ] = False,
    job_store: Annotated[
        str | None,
        typer.Option(
            metavar="DIR|memory",
            help="folder of jobs and their checkpoints (a restart resumes them); 'memory': none",
        ),
    ] = None,
) -> int:
    """Run the sampling kernel as a gRPC SamplerService until SIGTERM or Ctrl-C.

    Example: [bold]poegen sampler --port 50050 --allow-expert 127.0.0.1:50051[/bold]
    """
    flags = SamplerFlags(
        config, host, port, max_jobs, grace, tuple(allow_expert or ()), shared_memory, job_store
    )
    status = run(flags)
    if status == 2:
        return status  # nothing was served
    exit_now(status)  # drained and stopped: skip the interpreter's slow teardown


def register(app: typer.Typer) -> None:
    """Add ``poegen sampler`` to the CLI."""
    app.command("sampler", help=sampler_command.__doc__)(sampler_command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poegen.clients.sampler_cli``: the same as ``poegen sampler``."""
    from poegen.clients.cli import main as cli_main

    return cli_main(["sampler", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(main())
