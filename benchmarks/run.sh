#!/usr/bin/env bash
# The benchmark set quoted in the README and closing notes: both model shapes,
# every available backend, beside HF transformers + torch, with per-op figures.
set -euo pipefail
repeats=${REPEATS:-5}
for shape in distilgpt2 gpt2; do
    echo "=== $shape ==="
    opswitch bench --shape "$shape" --repeats "$repeats" --prompt-tokens 64 --new-tokens 32 --ops "$@"
    echo
done
