#!/usr/bin/env bash
# Train on this machine with the deepspeed launcher: every GPU, or NPROC CPU ranks (default 2).
#   launchers/local.sh zero=stage3 offload=optimizer train.max_steps=100
# Hydra overrides pass straight through; the launcher's --local_rank is handled by bigtrain.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=${NPROC:-$(nvidia-smi -L | grep -c '^GPU')}
else
    NPROC=${NPROC:-2}
fi
exec "$VENV/bin/deepspeed" --num_gpus "$NPROC" --module bigtrain.train "$@"
