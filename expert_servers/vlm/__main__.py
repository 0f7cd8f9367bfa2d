"""Serve one VQAScore reward model: ``python -m poegen.expert_servers.vlm BACKEND MODEL``.

::

    python -m poegen.expert_servers.vlm vlm  models/qwen2-vl-2b --option dtype=bfloat16
    .venv-vllm/bin/python -m poegen.expert_servers.vlm vllm models/tiny-llm \\
        --option max_model_len=256 --port 0
    python -m poegen.expert_servers.vlm vllm tiny --option endpoint=http://127.0.0.1:8000/v1

``BACKEND`` is ``vlm`` (transformers) or ``vllm`` (:mod:`.vllm_backend`; the engine needs the
environment of ``scripts/setup_vllm.sh``). ``MODEL`` is a folder, a hub id already in the local
cache, or (with ``endpoint``) the served model's name. ``--option KEY=VALUE`` (repeatable)
passes the adapter's options. Host flags as ``poegen serve`` (``--host``, ``--port``,
``--config`` with a ``server:`` section, ``--model-root`` for later ``LoadModel``\\ s,
``--metrics-port``, ``--grace``). Once listening it prints
``poegen: serving BACKEND on HOST:PORT``. Exit status: 0 after a clean shutdown, 2 for bad
arguments or a model that fails to load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from poegen.expert_servers.server.adapter import ModelRef
from poegen.expert_servers.server.cli import server_settings
from poegen.expert_servers.server.config import ConfigError, parse_server_config, read_yaml
from poegen.expert_servers.server.server import serve
from poegen.expert_servers.vlm.adapters import VLLMAdapter, VLMAdapter
from poegen.kernel.errors import ExpertError

ADAPTERS = {"vlm": VLMAdapter, "vllm": VLLMAdapter}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m poegen.expert_servers.vlm")
    parser.add_argument("backend", choices=sorted(ADAPTERS))
    parser.add_argument("model", help="model folder, cached hub id, or served model name")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", type=Path, help="YAML file with a server: section")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port; 0 picks a free one and prints it")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port")
    parser.add_argument("--model-root", type=Path, help="LoadModel ids are paths under it")
    parser.add_argument("--grace", type=float, dest="grace_s", help="drain time on shutdown (s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = dict(_pair(o) for o in args.option)
        data = read_yaml(args.config) if args.config is not None else {}
        config = parse_server_config(server_settings(args, data))
        path = Path(args.model)
        ref = ModelRef(args.model, path.resolve() if path.exists() else None)
        adapter = ADAPTERS[args.backend]()
        served = adapter.load(ref, options, lambda fraction, message: None)
    except (ConfigError, ExpertError, ValueError) as e:
        print(f"poegen vlm: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(
        serve(
            config,
            adapter=adapter,
            expert=served,
            model_id=args.model,
            name=args.backend,
            announce=lambda line: print(line, flush=True),
        )
    )


def _pair(option: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ValueError(f"--option: {option!r} is not KEY=VALUE")
    return key.strip(), value


if __name__ == "__main__":
    sys.exit(main())
