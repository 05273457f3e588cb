#!/usr/bin/env bash
# Run a bigtrain launch command again after a crash or preemption, up to MAX_RESTARTS times; each
# relaunch resumes from the run's newest valid checkpoint (checkpoint.resume=auto), so pass the same
# run_dir every time (the default run_dir is derived from the overrides, so the same command works).
#
#   MAX_RESTARTS=3 launchers/restart.sh deepspeed --num_gpus 2 --module bigtrain.train zero=stage3
#
# Exit codes that a relaunch cannot fix end the loop at once: 0 (done), 2 (bad config) and
# 3 (repeated non-finite losses: lower the learning rate first).
set -uo pipefail
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_DELAY_S=${RESTART_DELAY_S:-10}
attempt=0
while true; do
    "$@"
    code=$?
    case $code in
        0) exit 0 ;;
        2|3) echo "restart.sh: exit code $code will not be fixed by relaunching; stopping" >&2; exit $code ;;
    esac
    if (( attempt >= MAX_RESTARTS )); then
        echo "restart.sh: exit code $code after $attempt restarts; giving up" >&2
        exit $code
    fi
    attempt=$((attempt + 1))
    echo "restart.sh: exit code $code; relaunching in ${RESTART_DELAY_S}s (restart $attempt of $MAX_RESTARTS)" >&2
    sleep "$RESTART_DELAY_S"
done
