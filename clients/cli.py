"""The ``poegen`` command line (typer + rich).

Commands (``poegen COMMAND --help`` shows each one's flags and an example):

=================  ==========================================================================
``serve``          an expert server of any backend (:mod:`poegen.expert_servers.server.cli`)
``sampler``        the Sampler service (:mod:`poegen.clients.sampler_cli`)
``up``             a local stack from a stack file: experts + Sampler as processes
``generate``       a spec → images/video/particles, with a live progress bar
``swap``           hot-swap the model of an expert server, with load progress
``health``         the health of one or more endpoints
``describe``       what an expert server serves
``schema``         the JSON Schema of spec files (for editors)
``demo``           the demo through a real local stack (:mod:`poegen.clients.demo`)
=================  ==========================================================================

Conventions. Exit status 0 on success, 1 on a failure (an RPC error, a server that died), 2 on
a usage error (unknown flag or backend, an invalid spec or config: the message names the field
and the path inside the file). Errors are one line on stderr, ``poegen: error: ...``; the
traceback only with ``--debug`` (or ``POEGEN_DEBUG=1``). Logging goes to stderr (``--log-level``);
stdout carries the commands' output only.

:func:`main` is the entry point (``poegen = poegen.clients.cli:main``); it takes ``argv`` and
returns the status instead of exiting, so tests call it directly. A new command is a module
with ``register(app)``, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer

from poegen.clients.errors import CLIError, PoegenError
from poegen.clients.files import SpecError

COMMANDS: tuple[str, ...] = (
    "poegen.expert_servers.server.cli",
    "poegen.clients.sampler_cli",
    "poegen.clients.commands",
    "poegen.clients.job_cli",
    "poegen.clients.demo",
)

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _root(
    log_level: Annotated[
        str, typer.Option(help="log level on stderr: DEBUG, INFO, WARNING, ERROR")
    ] = "WARNING",
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="one JSON object per log line (for collectors)")
    ] = False,
) -> None:
    """poegen: training-free product-of-experts sampling.

    Start here: [bold]poegen demo[/bold] (a real local stack on the CPU, about a minute).
    """
    level = "DEBUG" if debug else log_level.upper()
    if level not in _LEVELS:
        raise typer.BadParameter(f"{log_level!r} is not one of {', '.join(_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JSONFormatter() if log_json else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    )  # fmt: skip
    logging.basicConfig(level=level, handlers=[handler])


class JSONFormatter(logging.Formatter):
    """A log record as one JSON object: time (ISO 8601, UTC), level, logger, message and,
    when an exception is logged, its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_app() -> typer.Typer:
    """The ``poegen`` typer app with every command of :data:`COMMANDS`."""
    app = typer.Typer(
        name="poegen",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for module in COMMANDS:
        importlib.import_module(module).register(app)
    return app


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("POEGEN_DEBUG", "") not in ("", "0")


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    rest = message.strip().splitlines()[1:]
    print(f"poegen: error: {first}", file=sys.stderr)
    for line in rest:  # quoted process output (a server's last log lines) stays readable
        print(f"  {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    try:
        result = build_app()(args=args, prog_name="poegen", standalone_mode=False)
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.TyperException as e:  # typer's click: usage errors (exit_code 2)
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            _error(e.format_message())
        return int(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("poegen: interrupted", file=sys.stderr)
        return 130
    except SpecError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
        return 2
    except CLIError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
        return e.exit_code
    except PoegenError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
        return 1
    except Exception as e:  # the last resort: one line, not a traceback
        if debug:
            traceback.print_exc()
        _error(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        return 1
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
