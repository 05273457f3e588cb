#!/usr/bin/env bash
# Run a bigtrain launch command again after a crash, hang or preemption, up to MAX_RESTARTS times;
# each relaunch resumes from the run's newest valid checkpoint (checkpoint.resume=auto), so pass the
# same run_dir every time (the default run_dir is derived from the overrides, so the same command
# works).
#
#   MAX_RESTARTS=3 launchers/restart.sh deepspeed --num_gpus 2 --module bigtrain.train zero=stage3
#   MAX_RESTARTS=3 launchers/restart.sh launchers/multinode.sh hostfile zero=stage3
#   MAX_RESTARTS=3 launchers/restart.sh launchers/node.sh hostfile NODE_RANK zero=stage3  (on every node)
#   MAX_RESTARTS=3 sbatch launchers/slurm.sbatch zero=stage3                  (wraps srun in this)
#
# Multi-node: when a node dies, the ranks of the others fail their next collective and exit 5, so
# the whole job ends and is relaunched on every node (per-node launches: each node's wrapper
# relaunches its part, and the parts meet again at the master address). A relaunched
# multinode.sh checks the hosts first: a node that stays unreachable is a launch-check failure
# (exit 2) and ends the loop.
#
# Exit codes a relaunch cannot fix end the loop at once: 0 (done), 2 (bad config), 3 (repeated
# non-finite losses: lower the learning rate first), 4 (a checkpoint could not be written: free
# disk space first). SIGTERM/SIGINT to this script go to the job (which saves and exits) and end
# the loop.
set -uo pipefail
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_DELAY_S=${RESTART_DELAY_S:-10}
stopping=0
trap 'stopping=1; [ -n "${job:-}" ] && kill -TERM -- -$job 2>/dev/null' TERM INT
set -m  # each attempt runs in a process group of its own, so a signal reaches all of its processes
attempt=0
while true; do
    "$@" &
    job=$!
    while true; do
        wait "$job"
        code=$?
        kill -0 "$job" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
    done
    case $code in
        0) exit 0 ;;
        2|3|4) echo "restart.sh: exit code $code will not be fixed by relaunching; stopping" >&2; exit $code ;;
    esac
    if (( stopping )); then
        echo "restart.sh: stopped by a signal (job exit code $code)" >&2
        exit $code
    fi
    if (( attempt >= MAX_RESTARTS )); then
        echo "restart.sh: exit code $code after $attempt restarts; giving up" >&2
        exit $code
    fi
    attempt=$((attempt + 1))
    echo "restart.sh: exit code $code; relaunching in ${RESTART_DELAY_S}s (restart $attempt of $MAX_RESTARTS)" >&2
    sleep "$RESTART_DELAY_S"
done
