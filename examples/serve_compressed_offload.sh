#!/usr/bin/env bash
# Serves MODEL with compressed CPU offloading of the KV cache.
#
#   bash examples/serve_compressed_offload.sh MODEL [extra vllm serve flags...]
#   python examples/openai_client_request.py            # in another shell
#
# KV blocks that leave the GPU are compressed on the GPU (error bound 3e-2 of each
# page's value range) and kept in a 16 GiB pinned host arena, so a prompt that
# repeats a long prefix reloads it instead of recomputing it.
# --enable-prompt-tokens-details makes each response report its cached prompt
# tokens (usage.prompt_tokens_details.cached_tokens); the compression metrics are
# on http://localhost:8000/metrics (vllm:kv_offload_*).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL [extra vllm serve flags...]" >&2
  exit 2
fi
model=$1
shift

exec vllm serve "$model" \
  --kv-offloading-size 16 \
  --enable-compression \
  --compression-error-bound 0.03 \
  --compression-mode fixed \
  --enable-prompt-tokens-details \
  "$@"
