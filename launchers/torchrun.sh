#!/usr/bin/env bash
# Train on this machine with torchrun: NPROC processes (default 2).
#   launchers/torchrun.sh zero=stage1 train.max_steps=100
# torchrun passes SIGTERM/SIGINT on to its workers, which save a checkpoint and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
exec "$VENV/bin/torchrun" --nproc_per_node "${NPROC:-2}" -m bigtrain.train "$@"
