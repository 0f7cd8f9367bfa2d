"""``poegen job``: the jobs of a Sampler service, by id.

::

    poegen job list   --sampler HOST:PORT [--json]
    poegen job status JOB_ID --sampler HOST:PORT [--json]
    poegen job cancel JOB_ID --sampler HOST:PORT
    poegen job attach JOB_ID --sampler HOST:PORT [--spec FILE] [-o OUT]

``attach`` follows a running job to its end (or takes an ended job's result) and writes the
outputs ``poegen generate`` writes (samples decoded as the spec says, when ``--spec`` names
the job's spec file). A job started with ``poegen generate … --job-id ID --detach`` keeps
running when that command is interrupted; a Sampler restarted on its job store resumes it.
Tokens and TLS come from the environment as for ``poegen generate`` (``POEGEN_TOKEN``,
``POEGEN_TLS_*``). Exit status: 0; 1 when the job failed or was cancelled (``attach``) or is
unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from poegen.clients.errors import CLIError, GenerationError

_stdout = Console()
_stderr = Console(stderr=True)

SamplerOption = Annotated[str, typer.Option(help="host:port of the Sampler service")]


def _client(sampler: str) -> Any:
    from poegen.clients.endpoints import ClientTLS
    from poegen.clients.sdk import Client

    return Client(sampler, token=os.environ.get("POEGEN_TOKEN") or None, tls=ClientTLS.from_env())


def _one_line(info: Any) -> str:
    done = f"{info.levels_done}/{info.levels or '?'} levels"
    resumed = f", resumed {info.resumes}×" if info.resumes else ""
    error = f": {info.error}" if info.error is not None else ""
    return f"{info.job_id} {info.state} ({done}{resumed}){error}"


def list_command(
    sampler: SamplerOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    """List the Sampler's jobs: running and queued first, then ended ones, newest first.

    Example: [bold]poegen job list --sampler 127.0.0.1:50050[/bold]
    """
    with _client(sampler) as client:
        jobs = client.jobs()
    if as_json:
        print(json.dumps([j.as_dict() for j in jobs], indent=1))
        return 0
    table = Table("job", "state", "levels", "resumes", box=None)
    for job in jobs:
        table.add_row(job.job_id, job.state, f"{job.levels_done}/{job.levels or '?'}",
                      str(job.resumes))  # fmt: skip
    _stdout.print(table)
    return 0


def status_command(
    job_id: Annotated[str, typer.Argument(help="the job's id", show_default=False)],
    sampler: SamplerOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    """Show a job's state, levels done and error.

    Example: [bold]poegen job status cats-42 --sampler 127.0.0.1:50050[/bold]
    """
    with _client(sampler) as client:
        info = client.job(job_id)
    print(json.dumps(info.as_dict(), indent=1) if as_json else _one_line(info))
    return 0


def cancel_command(
    job_id: Annotated[str, typer.Argument(help="the job's id", show_default=False)],
    sampler: SamplerOption,
) -> int:
    """Stop a queued or running job.

    Example: [bold]poegen job cancel cats-42 --sampler 127.0.0.1:50050[/bold]
    """
    with _client(sampler) as client:
        print(_one_line(client.cancel(job_id)))
    return 0


def attach_command(
    job_id: Annotated[str, typer.Argument(help="the job's id", show_default=False)],
    sampler: SamplerOption,
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="the job's spec file: decode its samples")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("out/attach"),
) -> int:
    """Follow a job to its end and write its outputs (as poegen generate does).

    Example: [bold]poegen job attach cats-42 --sampler 127.0.0.1:50050 -o out/cats[/bold]
    """
    from poegen.clients.outputs import write_outputs
    from poegen.clients.sdk import GenerationResult
    from poegen.clients.spec import GenerationSpec

    spec = GenerationSpec.from_file(spec_file) if spec_file is not None else None
    result = None
    with _client(sampler) as client:
        try:
            for event in client.attach(job_id, spec=spec):
                if isinstance(event, GenerationResult):
                    result = event
                else:
                    _stderr.print(f"level {event.step + 1}/{event.total or '?'}  "
                                  f"σ {event.sigma:.3f}  ESS {event.ess:.2f}")  # fmt: skip
        except GenerationError as e:
            raise CLIError(f"job {job_id}: {e}") from None
    assert result is not None
    _stderr.print(f"job {job_id}: {result.particles.shape[0]} particles, ESS {result.ess:.1f}, "
                  f"log Z {result.log_evidence:.3g}")  # fmt: skip
    for path in write_outputs(result, out, spec):
        print(path)
    return 0


def register(app: typer.Typer) -> None:
    """Add ``poegen job list|status|cancel|attach`` to the CLI."""
    jobs = typer.Typer(help="The jobs of a Sampler service, by id.", no_args_is_help=True)
    for name, command in (("list", list_command), ("status", status_command),
                          ("cancel", cancel_command), ("attach", attach_command)):  # fmt: skip
        jobs.command(name, help=command.__doc__)(command)
    app.add_typer(jobs, name="job")


__all__ = ["attach_command", "cancel_command", "list_command", "register", "status_command"]
