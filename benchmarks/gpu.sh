#!/usr/bin/env bash
# The 3B bf16 benchmark on a lent GPU machine, end to end, in one command:
#   bash benchmarks/gpu.sh [CHECKPOINT_DIR] [JSON]
# writes a random paligemma-3b-224 bf16 checkpoint, then runs JAX, the
# PyTorch reference and transformers on the GPU against its memory-bandwidth
# roofline and prints the table. Uses the machine's own python3 (jax with CUDA, torch,
# transformers); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:-/tmp/pg3b-bf16}
JSON=${2:-benchmark-gpu.json}
PY=${PYTHON:-python3}
start=$(date +%s)
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices()[0].device_kind)"
"$PY" -m convert.random_checkpoint --variant=paligemma-3b-224 --dtype=bfloat16 --output="$CKPT" --overwrite
"$PY" -m benchmarks.decode --device=gpu --checkpoint="$CKPT" --dtype=bfloat16 \
    --impls=jax,torch,transformers --json="$JSON"
echo "total $(( $(date +%s) - start )) s"
