#!/usr/bin/env bash
# Train on this machine with the deepspeed launcher: every GPU, or NPROC CPU ranks (default 2).
#   launchers/local.sh zero=stage3 offload=optimizer train.max_steps=100
# Hydra overrides pass straight through; the launcher's --local_rank is handled by bigtrain.
# SIGTERM/SIGINT to this script reach every rank, which save a checkpoint and exit (code 75).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=${NPROC:-$(nvidia-smi -L | grep -c '^GPU')}
else
    NPROC=${NPROC:-2}
fi
# The single-node deepspeed command does not pass signals on to its ranks: run it in a process
# group of its own and signal the whole group.
set -m
"$VENV/bin/deepspeed" --num_gpus "$NPROC" --module bigtrain.train "$@" &
job=$!
trap 'kill -TERM -- -$job 2>/dev/null' TERM INT
while true; do
    wait "$job"
    code=$?
    kill -0 "$job" 2>/dev/null || exit "$code"  # wait returned for a trapped signal: keep waiting
done
