"""The client commands of ``poegen``: up, generate, swap, health, describe, schema.

Each command is a thin layer over the SDK (:mod:`poegen.clients.sdk`,
:mod:`poegen.clients.stack`, :mod:`poegen.clients.endpoints`): parse flags, call, print.
Progress goes to stderr (rich), results to stdout. See :mod:`poegen.clients.cli` for the
exit statuses and error conventions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from poegen.clients.errors import CLIError

_stdout = Console(highlight=False, soft_wrap=True)
_stderr = Console(stderr=True, highlight=False)


def _parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint=flag)
        out[key] = value
    return out


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C does) while inside."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _naming(spec_file: Path) -> Iterator[None]:
    """Spec errors found while building the request name the spec file, not ``spec``."""
    from poegen.clients.files import SpecError

    try:
        yield
    except SpecError as e:
        if e.source != "spec":
            raise
        raise SpecError(str(spec_file), e.problems) from None


# --------------------------------------------------------------------------- up


def up_command(
    stack_file: Annotated[Path, typer.Argument(help="stack file (YAML)", show_default=False)],
    log_dir: Annotated[
        Path | None, typer.Option(help="write each process's stderr to DIR/NAME.log")
    ] = None,
) -> int:
    """Start every expert server and the Sampler of a stack file; Ctrl-C stops them all.

    Prints one line per process (name, address, pid) once all are SERVING.

    Example: [bold]poegen up examples/t1_stack.yaml[/bold]
    """
    from poegen.clients.stack import LocalStack, StackError

    stack = LocalStack.from_yaml(stack_file, log_dir=log_dir)
    with _terminate_as_interrupt():
        try:
            with _stderr.status("starting the stack…"):
                stack.start()
        except StackError as e:
            raise CLIError(str(e)) from None
        try:
            for name, address, pid in _summary(stack):
                print(f"{name:<12} {address:<22} pid {pid}", flush=True)
            print(
                f"poegen: stack up ({len(stack.processes)} processes); Ctrl-C stops it", flush=True
            )
            exited = None
            while exited is None:
                exited = stack.wait(timeout=0.5)
            name, code = exited
            tail = stack.describe_failure(name)
            stack.stop()
            raise CLIError(f"{name} exited with status {code}; stopped the stack\n{tail}")
        except KeyboardInterrupt:
            codes = stack.stop()
            _stderr.print(f"poegen: stopped {len(codes)} processes")
            return 0
        finally:
            stack.stop()


def _summary(stack: Any) -> list[tuple[str, str, int]]:
    from poegen.clients.stack import stack_summary

    return stack_summary(stack)


# --------------------------------------------------------------------------- generate


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]level[/bold]"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("σ {task.fields[sigma]:.3f}  ESS {task.fields[ess]:.2f}"),
        TextColumn("resampled {task.fields[resampled]}×"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=_stderr,
        transient=False,
    )


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:4.0f}s" if seconds < 600 else f"{seconds / 60:.0f}m"


def run_generate(
    spec: Any,
    out: Path | None,
    *,
    sampler: str | None,
    endpoints: dict[str, str],
    timeout: float | None,
    job_id: str | None = None,
    detach: bool = False,
    reattach_s: float = 0.0,
) -> Any:
    """Run a spec with a live progress bar; write outputs to ``out``; the result."""
    from poegen.clients.endpoints import ClientTLS
    from poegen.clients.outputs import write_outputs
    from poegen.clients.sdk import Client, GenerationResult

    total = spec.total_levels()
    resampled = 0
    result: GenerationResult | None = None
    client = Client(
        sampler,
        endpoints=endpoints,
        token=os.environ.get("POEGEN_TOKEN") or None,
        expert_token=os.environ.get("POEGEN_EXPERT_TOKEN") or None,
        tls=ClientTLS.from_env(),
        expert_tls=ClientTLS.from_env("POEGEN_EXPERT"),
        reattach_s=reattach_s,
    )
    with client, _progress_bar() as bar:
        task = bar.add_task("generate", total=total, sigma=1.0, ess=1.0, resampled=0, eta="?")
        for event in client.stream(spec, timeout=timeout, job_id=job_id, detach=detach):
            if isinstance(event, GenerationResult):
                result = event
                break
            resampled += int(event.resampled)
            bar.update(
                task,
                completed=event.step + 1,
                total=event.total,
                sigma=event.sigma,
                ess=event.ess,
                resampled=resampled,
                eta=_eta(event.eta_s),
            )
    assert result is not None
    experts = ", ".join(f"{r.name} ({r.model_id} {'→'.join(r.revisions)})" for r in result.experts)
    _stderr.print(
        f"{result.particles.shape[0]} particles of shape {list(result.sample_shape)} in "
        f"{result.seconds:.1f}s: ESS {result.ess:.1f}, log Z {result.log_evidence:.3g}; {experts}"
    )
    if out is not None:
        written = write_outputs(result, out, spec)
        for path in written:
            print(path)
    return result


def generate_command(
    spec_file: Annotated[
        Path, typer.Argument(help="generation spec (YAML/JSON)", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("out/generate"),
    sampler: Annotated[str | None, typer.Option(help="host:port of a Sampler service")] = None,
    stack: Annotated[Path | None, typer.Option(help="bring up this stack file for the run")] = None,
    in_process: Annotated[
        bool,
        typer.Option("--in-process", help="run the kernel here against the experts (no Sampler)"),
    ] = False,
    endpoint: Annotated[
        list[str] | None, typer.Option(help="NAME=HOST:PORT for `endpoint:` names (repeat)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="override the spec's seed")] = None,
    particles: Annotated[int | None, typer.Option(help="override settings.num_particles")] = None,
    steps: Annotated[int | None, typer.Option(help="override settings.num_steps")] = None,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    job_id: Annotated[
        str | None, typer.Option(help="the job's id on the Sampler (see poegen job)")
    ] = None,
    detach: Annotated[
        bool, typer.Option(help="the job keeps running if this command is interrupted")
    ] = False,
    reattach: Annotated[
        float, typer.Option(help="re-attach for this many seconds if the Sampler restarts")
    ] = 0.0,
) -> int:
    """Run a generation spec and write PNGs/MP4s, a contact sheet and the trace to a folder.

    Live progress: level, noise level σ, ESS, resampling count, ETA.

    Example: [bold]poegen generate examples/t1.yaml --stack examples/t1_stack.yaml -o out/t1[/bold]
    (or: poegen generate spec.yaml --sampler 127.0.0.1:50050 -o out/run)
    """
    from poegen.clients.spec import GenerationSpec
    from poegen.clients.stack import LocalStack, StackError

    if sampler is not None and stack is not None:
        raise typer.BadParameter("give --sampler or --stack, not both", param_hint="--stack")
    spec = GenerationSpec.from_file(spec_file)
    overrides = {"num_particles": particles, "num_steps": steps}
    given = {k: v for k, v in overrides.items() if v is not None}
    if given or seed is not None:
        data = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
        data.setdefault("settings", {}).update(given)
        if seed is not None:
            data["seed"] = seed
        spec = GenerationSpec.from_mapping(
            data, base_dir=spec_file.resolve().parent, source=str(spec_file)
        )
    endpoints = _parse_pairs(endpoint or (), "--endpoint")
    if stack is None:
        if sampler is None and not in_process:
            raise typer.BadParameter(
                "say where to run: --sampler HOST:PORT, --stack FILE or --in-process",
                param_hint="--sampler",
            )
        with _naming(spec_file):
            run_generate(
                spec, out, sampler=sampler, endpoints=endpoints, timeout=timeout,
                job_id=job_id, detach=detach, reattach_s=reattach,
            )  # fmt: skip
        return 0
    local = LocalStack.from_yaml(stack)
    with _terminate_as_interrupt():
        try:
            with _stderr.status("starting the stack…"):
                local.start()
        except StackError as e:
            raise CLIError(str(e)) from None
        try:
            found = local.endpoints
            with _naming(spec_file):
                run_generate(
                    spec,
                    out,
                    sampler=None if in_process else found.sampler,
                    endpoints={**found.experts, **endpoints},
                    timeout=timeout,
                )
        finally:
            local.stop()
    return 0


# --------------------------------------------------------------------------- swap, health, describe


def swap_command(
    endpoint: Annotated[
        str, typer.Argument(help="host:port of an expert server", show_default=False)
    ],
    model: Annotated[
        str, typer.Option(help="model id: a path under its model root, or an allowlisted id")
    ],
    option: Annotated[list[str] | None, typer.Option(help="load option key=value (repeat)")] = None,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
) -> int:
    """Hot-swap the model an expert server serves, with load progress.

    The admin token comes from POEGEN_ADMIN_TOKEN (and the bearer token from POEGEN_TOKEN).
    In-flight calls finish on the old model; new calls go to the new one.

    Example: [bold]poegen swap 127.0.0.1:50051 --model ring_wide.yaml[/bold]
    """
    from poegen.clients.endpoints import ClientTLS, swap

    options = _parse_pairs(option or (), "--option")
    revision = ""
    with Progress(
        TextColumn("[bold]{task.fields[stage]}[/bold]"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%  {task.fields[message]}"),
        TimeElapsedColumn(),
        console=_stderr,
    ) as bar:
        task = bar.add_task("swap", total=1.0, stage="queued", message="")
        for event in swap(
            endpoint,
            model,
            options,
            token=os.environ.get("POEGEN_TOKEN") or None,
            admin_token=os.environ.get("POEGEN_ADMIN_TOKEN") or None,
            timeout=timeout,
            tls=ClientTLS.from_env(),
        ):
            revision = event.revision or revision
            bar.update(task, completed=event.progress, stage=event.stage, message=event.message)
    print(f"{endpoint}: serving {model} (revision {revision})")
    return 0


def health_command(
    endpoints: Annotated[
        list[str],
        typer.Argument(help="host:port of expert servers or Sampler services", show_default=False),
    ],
    timeout: Annotated[float, typer.Option(help="seconds per check")] = 3.0,
) -> int:
    """Check the gRPC health of endpoints; status 1 unless every one is SERVING.

    Example: [bold]poegen health 127.0.0.1:50051 127.0.0.1:50050[/bold]
    """
    from poegen.clients.endpoints import ClientTLS, health

    tls = ClientTLS.from_env()
    statuses = [(address, health(address, timeout=timeout, tls=tls)) for address in endpoints]
    for address, status in statuses:
        print(f"{address:<22} {status}")
    return 0 if all(s == "SERVING" for _, s in statuses) else 1


def describe_command(
    endpoint: Annotated[
        str, typer.Argument(help="host:port of an expert server", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    """Show what an expert server serves: kind, capabilities, shape, model and revision.

    Example: [bold]poegen describe 127.0.0.1:50051 --json[/bold]
    """
    import dataclasses

    from poegen.clients.endpoints import ClientTLS, describe

    info = describe(
        endpoint, token=os.environ.get("POEGEN_TOKEN") or None, tls=ClientTLS.from_env()
    )
    fields = dataclasses.asdict(info)
    if as_json:
        print(json.dumps(fields, indent=1))
        return 0
    table = Table(show_header=False, box=None)
    for key, value in fields.items():
        shown = ", ".join(map(str, value)) if isinstance(value, tuple | list) else value
        table.add_row(f"[bold]{key}[/bold]", str(shown if shown not in ("", None) else "-"))
    _stdout.print(table)
    return 0


def schema_command(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write to FILE")] = None,
) -> int:
    """Print the JSON Schema of generation spec files (point your editor's YAML plugin at it).

    Example: [bold]poegen schema -o docs/spec.schema.json[/bold]
    """
    from poegen.clients.spec import json_schema

    text = json.dumps(json_schema(), indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    return 0


def register(app: typer.Typer) -> None:
    """Add up, generate, swap, health, describe and schema to the CLI."""
    for name, command, needs_args in (
        ("up", up_command, True),
        ("generate", generate_command, True),
        ("swap", swap_command, True),
        ("health", health_command, True),
        ("describe", describe_command, True),
        ("schema", schema_command, False),
    ):
        app.command(name, help=command.__doc__, no_args_is_help=needs_args)(command)


__all__ = [
    "describe_command",
    "generate_command",
    "health_command",
    "register",
    "run_generate",
    "schema_command",
    "swap_command",
    "up_command",
]
