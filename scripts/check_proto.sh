#!/usr/bin/env bash
# Checks the wire contract (proto/poegen/v1/*.proto); CI runs it after `npm ci`.
#
#   1. drift:    regenerates the Python code with scripts/gen_proto.sh and fails if any file under
#                proto/ changed, appeared or vanished (the generated code is committed), or if
#                git does not track a file under proto/ (a generated file never `git add`-ed).
#   2. stubs:    every .proto has its _pb2.py, _pb2.pyi (--pyi_out) and _pb2_grpc.py.
#   3. lint:     `buf lint` (STANDARD + COMMENTS, see buf.yaml).
#   4. breaking: `buf breaking` (FILE) of proto/ against the previous state of proto/:
#                HEAD~1 when proto/ is as committed (CI), HEAD when proto/ has uncommitted
#                changes (a developer before committing). BUF_AGAINST_REF=<rev> overrides it.
#                Skipped, with a message, only when no earlier commit has proto/; a shallow
#                clone fails (fetch more history: `git fetch --deepen=1`).
#
# Environment: PYTHON (default .venv/bin/python, used by gen_proto.sh), BUF (default
# node_modules/.bin/buf, installed by `npm ci` from package.json / package-lock.json).
# Exit status: 0 when every check passes, 1 on a failed check, 2 when a tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-node_modules/.bin/buf}
fail=0

if [[ ! -x "$BUF" ]]; then
  echo "check_proto: buf not found at $BUF; run 'npm ci' first" >&2
  exit 2
fi

# 1. Drift: snapshot proto/, regenerate, compare file by file (byte content, and the file set).
snapshot=$(mktemp -d)
trap 'rm -rf "$snapshot"' EXIT
cp -a proto "$snapshot/proto"
bash scripts/gen_proto.sh
if ! diff -r -q -x __pycache__ "$snapshot/proto" proto; then
  echo "check_proto: generated code was stale; scripts/gen_proto.sh rewrote the files above." >&2
  echo "check_proto: commit the regenerated files." >&2
  fail=1
fi
untracked=$(git ls-files --others --exclude-standard -- proto/)
if [[ -n "$untracked" ]]; then
  echo "check_proto: files under proto/ that git does not track (git add them):" >&2
  echo "$untracked" >&2
  fail=1
fi

# 2. Generated stubs: messages, type stubs, gRPC stubs for every .proto.
for src in proto/poegen/v1/*.proto; do
  base=${src%.proto}
  for out in "${base}_pb2.py" "${base}_pb2.pyi" "${base}_pb2_grpc.py"; do
    if [[ ! -f "$out" ]]; then
      echo "check_proto: missing generated file $out" >&2
      fail=1
    fi
  done
done

# 3. Lint.
if ! "$BUF" lint; then
  echo "check_proto: buf lint failed" >&2
  fail=1
fi

# 4. Breaking changes against the previous state of proto/.
if [[ -n "${BUF_AGAINST_REF:-}" ]]; then
  ref=$BUF_AGAINST_REF
elif [[ -n "$(git status --porcelain -- proto/)" ]]; then
  ref=HEAD
  echo "check_proto: proto/ has uncommitted changes; checking breaking changes against HEAD"
else
  ref=HEAD~1
fi
if against=$(git rev-parse --verify -q "${ref}^{commit}"); then
  if [[ -n "$(git ls-tree -d --name-only "$against" proto)" ]]; then
    # A full commit id, not HEAD~1: buf clones .git itself, where HEAD may differ (detached CI).
    echo "check_proto: buf breaking against $ref ($against)"
    if ! "$BUF" breaking proto --against ".git#ref=${against},subdir=proto"; then
      echo "check_proto: buf breaking failed against $ref ($against)" >&2
      fail=1
    fi
  else
    echo "check_proto: skipping buf breaking: $ref ($against) has no proto/"
  fi
elif [[ "$(git rev-parse --is-shallow-repository)" == "true" ]]; then
  echo "check_proto: $ref is missing from this shallow clone; run 'git fetch --deepen=1'" >&2
  fail=1
else
  echo "check_proto: skipping buf breaking: no commit $ref to compare with"
fi

if [[ $fail -ne 0 ]]; then
  echo "check_proto: FAILED" >&2
  exit 1
fi
echo "check_proto: OK"
