#!/usr/bin/env bash
# The main job: install what it needs, then run the T1 demo (ring × bar, in-process, CPU).
# Writes out/demo_t1.png and prints the accuracy table. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/python -m poegen.clients.demo "$@"
