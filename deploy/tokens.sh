#!/bin/sh
# Write the stack's three bearer tokens into DIR, one random 256-bit hex token per file, no
# trailing newline (gRPC metadata cannot carry one):
#   expert-token   every expert's POEGEN_TOKEN, and the Sampler's POEGEN_EXPERT_TOKEN
#   admin-token    every expert's POEGEN_ADMIN_TOKEN (LoadModel: `poegen swap`)
#   sampler-token  the Sampler's POEGEN_TOKEN (what clients present)
# DIR is made owner-only (0700); the files inside are world-readable (0644) because compose
# bind-mounts each secret file as it is, and the containers run as uid 10001, not as you.
# Existing files are kept, so running it again rotates nothing.
#   sh deploy/tokens.sh deploy/compose/secrets      (compose secrets)
#   sh deploy/tokens.sh deploy/k8s/base/secrets     (the kustomize secretGenerator)
set -eu

if [ "$#" -ne 1 ]; then
    echo "usage: sh deploy/tokens.sh DIR" >&2
    exit 2
fi
dir=$1
mkdir -p "$dir"
chmod 700 "$dir"
umask 022
for name in expert-token admin-token sampler-token; do
    if [ -s "$dir/$name" ]; then
        continue
    fi
    token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s' "$token" > "$dir/$name"
    echo "wrote $dir/$name"
done
