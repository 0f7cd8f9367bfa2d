#!/usr/bin/env bash
# The main job: install what it needs, then run the demo through a real local stack
# (`poegen demo`): expert servers and the Sampler service as separate processes on this
# machine, the CLI as their client. CPU only, no downloads; writes out/demo_t1.png and prints
# the accuracy table. Extra arguments go to `poegen demo` (e.g. --seeds 1, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/poegen demo "$@"
