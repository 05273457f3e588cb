#!/usr/bin/env bash
# Train on this machine with torchrun: one process per visible GPU, or NPROC processes (default 2 on
# a CPU-only machine). torchrun leaves CUDA_VISIBLE_DEVICES as it is: rank i uses the i-th visible GPU.
#   launchers/torchrun.sh zero=stage1 train.max_steps=100
# torchrun passes SIGTERM/SIGINT on to its workers, which save a checkpoint and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
source launchers/gpus.sh
gpus=$(visible_gpus)
if [ -n "$gpus" ]; then
    default=$(printf '%s\n' "$gpus" | tr ',' '\n' | grep -c .)
else
    default=2
fi
exec "$VENV/bin/torchrun" --nproc_per_node "${NPROC:-$default}" -m bigtrain.train "$@"
