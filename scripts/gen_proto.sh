#!/usr/bin/env bash
# Regenerate the Python code (messages, type stubs, gRPC stubs) from proto/poegen/v1/*.proto.
# The output is committed; CI runs this and fails if the tree changes (drift).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out=proto --pyi_out=proto --grpc_python_out=proto \
  proto/poegen/v1/*.proto
