"""The ``poegen`` command line.

One subcommand per module: each module in :data:`COMMANDS` exposes
``add_parser(subparsers) -> None``, which registers its parser and sets ``func`` to a
``run(args) -> int`` returning the exit status. ``poegen serve`` lives in
:mod:`poegen.expert_servers.server.cli`; a new command (``generate``, ``demo``) is a module of
its own added to :data:`COMMANDS`. Logging is configured here, to stderr; stdout carries only
the commands' machine-readable output.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = (
    "poegen.expert_servers.server.cli",
    "poegen.clients.sampler_cli",
    "poegen.clients.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poegen", description="Training-free product-of-experts sampling."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level of the messages on stderr (default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
