"""``poegen serve BACKEND``: run an expert host until SIGTERM/SIGINT.

::

    poegen serve analytic --config expert.yaml [--host H] [--port N] [--metrics-port N]
                          [--model-root DIR]

``--config`` is a YAML file naming the expert and, optionally, the host settings::

    expert: gaussian_mixture          # an entry point of group poegen.experts
    params: {means: [[-2, 0], [2, 0]], covariances: [...], weights: [0.5, 0.5]}
    max_batch: 256
    latent_space: toy-2d
    server: {port: 0, model_root: experts/, grace_s: 10}   # see poegen.expert_servers.server.config

Flags override the ``server:`` section; the tokens come from ``POEGEN_TOKEN`` and
``POEGEN_ADMIN_TOKEN`` when set. Without ``expert:`` the host starts empty (UNAVAILABLE) until
a ``LoadModel`` of an expert file under the model root. Once listening it prints
``poegen: serving analytic on HOST:PORT`` (and ``poegen: metrics on HOST:PORT``) on stdout.
Exit status: 0 after a clean shutdown, 2 for an invalid configuration.

New backends (``flow``, ``vlm``) add a ``serve`` sub-parser in :data:`BACKENDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from poegen.expert_servers.server.config import ConfigError, parse_server_config, read_yaml
from poegen.expert_servers.server.expert_file import (
    ExpertFileAdapter,
    build_expert,
    parse_expert_file,
)
from poegen.expert_servers.server.server import serve

_ENV_TOKENS = {"token": "POEGEN_TOKEN", "admin_token": "POEGEN_ADMIN_TOKEN"}


def _announce(line: str) -> None:
    print(line, flush=True)


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file (expert and server: sections)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port; 0 picks a free one and prints it")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port")
    parser.add_argument("--model-root", type=Path, help="LoadModel ids are paths under it")
    parser.add_argument("--grace", type=float, dest="grace_s", help="drain time on shutdown (s)")


def server_settings(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The ``server:`` section of ``data`` with the flags and token variables applied."""
    settings = dict(data.get("server") or {})
    for key in ("host", "port", "metrics_port", "model_root", "grace_s"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    for key, variable in _ENV_TOKENS.items():
        if os.environ.get(variable):
            settings[key] = os.environ[variable]
    return settings


def run_analytic(args: argparse.Namespace) -> int:
    try:
        data = read_yaml(args.config) if args.config is not None else {}
        config = parse_server_config(server_settings(args, data))
        expert = build_expert(parse_expert_file(data)) if "expert" in data else None
    except (ConfigError, TypeError, ValueError) as e:
        print(f"poegen serve: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(
        serve(
            config,
            adapter=ExpertFileAdapter(),
            expert=expert,
            model_id="analytic",
            name="analytic",
            announce=_announce,
        )
    )


BACKENDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "analytic": ("an expert from a YAML file via the poegen.experts registry", run_analytic),
}


def add_parser(subparsers: Any) -> None:
    """Register ``poegen serve`` and its backends."""
    serve_parser = subparsers.add_parser("serve", help="serve an expert over gRPC")
    backends = serve_parser.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    for name, (help_text, run) in BACKENDS.items():
        parser = backends.add_parser(name, help=help_text)
        _add_host_flags(parser)
        parser.set_defaults(func=run)
