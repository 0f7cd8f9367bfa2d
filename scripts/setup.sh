#!/usr/bin/env bash
# Create .venv (Python 3.11) and install poegen with the given extras; safe to run twice.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh dev,demo
# torch is pinned to 2.13.0 (the CPU wheel) through constraints.txt, so no extra ever pulls
# another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-demo}

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "poegen needs Python 3.11 (python3.11 not found)" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv

# reinstall only when the requirements changed since these extras were installed
stamp=".venv/.poegen-installed-${extras//,/-}"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "poegen: installing .[$extras] into .venv (log: .venv/install.log)"
  if ! {
    .venv/bin/python -m pip install -q --upgrade pip &&
      .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  } >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
