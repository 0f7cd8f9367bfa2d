#!/usr/bin/env bash
# The main job: install what it needs, then run the demo through a real local stack
# (`poegen demo`): expert servers and the Sampler service as separate processes on this
# machine, the SDK as their client. CPU only, no downloads; prints a table and writes a figure
# under out/. Extra arguments go to `poegen demo` (e.g. --analytic for the ring x bar demo
# with exact ground truth, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/poegen demo "$@"
