#!/bin/sh
# poegen-entrypoint: the images' entry point. `poegen serve` and `poegen sampler` read their
# tokens from POEGEN_TOKEN, POEGEN_ADMIN_TOKEN and POEGEN_EXPERT_TOKEN; compose secrets arrive
# as files under /run/secrets. For each NAME of those, NAME_FILE=PATH exports NAME with the
# file's contents (trailing newlines dropped: gRPC metadata cannot carry them), then runs the
# command. A NAME_FILE that cannot be read, or is empty, stops the container with status 2,
# naming the variable: an empty token would be refused by the server anyway, less clearly.
set -eu

for name in POEGEN_TOKEN POEGEN_ADMIN_TOKEN POEGEN_EXPERT_TOKEN; do
    eval "file=\${${name}_FILE:-}"
    if [ -z "$file" ]; then
        continue
    fi
    if [ ! -r "$file" ]; then
        echo "poegen-entrypoint: error: ${name}_FILE: cannot read $file" >&2
        exit 2
    fi
    value=$(cat "$file")
    if [ -z "$value" ]; then
        echo "poegen-entrypoint: error: ${name}_FILE: $file is empty" >&2
        exit 2
    fi
    export "$name=$value"
    unset "${name}_FILE"
done

exec "$@"
