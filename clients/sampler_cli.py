"""``poegen sampler``: run the kernel as a gRPC ``SamplerService`` until SIGTERM/SIGINT.

::

    poegen sampler [--config FILE] [--host H] [--port N] [--max-jobs N] [--grace S]
                   [--allow-expert HOST:PORT ...] [--shared-memory]

``--config`` is a YAML file whose ``sampler:`` section holds
:class:`poegen.kernel.service.SamplerServerConfig`::

    sampler:
      host: 127.0.0.1
      port: 50050
      max_jobs: 4
      allowed_experts: [127.0.0.1:50051, 127.0.0.1:50052]
      expert_deadline_s: 60
      expert_retries: 5

Flags override the file. Tokens come from the environment: ``POEGEN_TOKEN`` (the bearer token
clients of the sampler must present) and ``POEGEN_EXPERT_TOKEN`` (the one the sampler presents
to the experts). Once listening it prints ``poegen: serving sampler on HOST:PORT`` on
stdout (the line format of ``poegen serve``).
Exit status: 0 after a clean shutdown, 2 for an invalid configuration.

Registered in :data:`poegen.clients.cli.COMMANDS` as ``poegen.clients.sampler_cli``; also
runnable as ``python -m poegen.clients.sampler_cli [flags]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from poegen.expert_servers.server.config import ConfigError, format_validation_error, read_yaml
from poegen.kernel.service import SamplerServerConfig, serve_sampler

_ENV_TOKENS = {"token": "POEGEN_TOKEN", "expert_token": "POEGEN_EXPERT_TOKEN"}


def _announce(line: str) -> None:
    print(line, flush=True)


def sampler_config(args: argparse.Namespace) -> SamplerServerConfig:
    """The ``sampler:`` section of ``--config`` with flags and token variables applied."""
    data = read_yaml(args.config) if args.config is not None else {}
    settings: dict[str, Any] = dict(data.get("sampler") or {})
    for key in ("host", "port", "max_jobs", "grace_s"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if args.allowed_experts:
        settings["allowed_experts"] = tuple(args.allowed_experts)
    if args.shared_memory:
        settings["shared_memory"] = True
    for key, variable in _ENV_TOKENS.items():
        if os.environ.get(variable):
            settings[key] = os.environ[variable]
    try:
        return SamplerServerConfig.model_validate(settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "sampler")) from None


def run(args: argparse.Namespace) -> int:
    try:
        config = sampler_config(args)
    except (ConfigError, ValueError) as e:
        print(f"poegen sampler: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve_sampler(config, announce=_announce))


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with a sampler: section")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port; 0 picks a free one and prints it")
    parser.add_argument("--max-jobs", type=int, dest="max_jobs", help="jobs running at once")
    parser.add_argument("--grace", type=float, dest="grace_s", help="shutdown grace (s)")
    parser.add_argument(
        "--allow-expert",
        action="append",
        dest="allowed_experts",
        metavar="HOST:PORT",
        help="an expert address requests may name (repeat; default: any)",
    )
    parser.add_argument(
        "--shared-memory", action="store_true", help="shared-memory tensors to local experts"
    )


def add_parser(subparsers: Any) -> None:
    """Register ``poegen sampler``."""
    parser = subparsers.add_parser("sampler", help="run the sampling kernel as a gRPC service")
    _add_flags(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poegen.clients.sampler_cli``: the same as ``poegen sampler``."""
    parser = argparse.ArgumentParser(prog="poegen sampler", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    _add_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
