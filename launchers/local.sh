#!/usr/bin/env bash
# Train on this machine with the deepspeed launcher: every visible GPU, or NPROC CPU ranks (default 2).
#   launchers/local.sh zero=stage3 offload=optimizer train.max_steps=100
#   CUDA_VISIBLE_DEVICES=2,3 launchers/local.sh ...     GPUs 2 and 3 only (NPROC: the first NPROC of them)
# Hydra overrides pass straight through; the launcher's --local_rank is handled by bigtrain.
# SIGTERM/SIGINT to this script reach every rank, which save a checkpoint and exit (code 75).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
source launchers/gpus.sh
gpus=$(visible_gpus)
if [ -n "$gpus" ]; then
    case $gpus in
        *[!0-9,]*)
            echo "local.sh: CUDA_VISIBLE_DEVICES=$gpus names GPUs by UUID or MIG instance, which the deepspeed launcher cannot pass on; use launchers/torchrun.sh, which keeps CUDA_VISIBLE_DEVICES as it is" >&2
            exit 2 ;;
    esac
    # --include, not --num_gpus: the launcher would otherwise take GPUs 0..N-1 whatever is visible.
    if [ -n "${NPROC:-}" ]; then
        gpus=$(printf '%s\n' "$gpus" | cut -d, -f"1-$NPROC")
    fi
    devices=(--include "localhost:$gpus")
else
    devices=(--num_gpus "${NPROC:-2}")
fi
# The single-node deepspeed command does not pass signals on to its ranks: run it in a process
# group of its own and signal the whole group.
set -m
"$VENV/bin/deepspeed" "${devices[@]}" --module bigtrain.train "$@" &
job=$!
trap 'kill -TERM -- -$job 2>/dev/null' TERM INT
while true; do
    wait "$job"
    code=$?
    kill -0 "$job" 2>/dev/null || exit "$code"  # wait returned for a trapped signal: keep waiting
done
