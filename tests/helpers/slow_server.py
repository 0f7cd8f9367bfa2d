"""A subprocess expert host for the drain test: ``python tests/helpers/slow_server.py DELAY_S GRACE_S``.

Serves ``helpers.server_experts.Gaussian`` with a fixed compute delay through ``serve`` (the same
entry point as ``poegen serve``), on 127.0.0.1 and a free port it prints.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers.server_experts import Gaussian

from poegen.expert_servers.server import ServerConfig, serve


def main() -> int:
    delay_s, grace_s = float(sys.argv[1]), float(sys.argv[2])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = ServerConfig(port=0, grace_s=grace_s)
    return asyncio.run(
        serve(
            config,
            expert=Gaussian(delay_s=delay_s),
            name="slow",
            announce=lambda s: print(s, flush=True),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
