#!/usr/bin/env bash
# Per-node launch, without ssh: run it on every node of HOSTFILE, giving each its position in the
# file (0 is the first host, where the ranks meet); each starts the ranks of its own slots.
#   node-01$ launchers/node.sh HOSTFILE 0 [OVERRIDES...]
#   node-02$ launchers/node.sh HOSTFILE 1 [OVERRIDES...]
# Every node must get the same hostfile and overrides. Before any rank starts, `bigtrain hosts`
# checks the hostfile, the node rank and the slots against the config (exit 2 with one paragraph).
# Environment: MASTER_ADDR (default: the hostfile's first host), MASTER_PORT (default 29500),
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the collectives' network interface, see README), VENV.
# SIGTERM/SIGINT reach this node's ranks, which save a checkpoint and exit (code 75).
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 HOSTFILE NODE_RANK [OVERRIDES...]" >&2
    exit 2
fi
hostfile=$(realpath -- "$1") || exit 2
node_rank=$2
shift 2
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MASTER_ADDR=${MASTER_ADDR:-$(awk '{sub(/#.*/, "")} NF {print $1; exit}' "$hostfile" 2>/dev/null)}
MASTER_PORT=${MASTER_PORT:-29500}

"$VENV/bin/python" -m bigtrain.cli hosts --no-ssh --node-rank "$node_rank" --master-addr "$MASTER_ADDR" \
    "$hostfile" "$@" || exit $?

# The deepspeed command does not pass signals on to its ranks on this path: run it in a process
# group of its own and signal the whole group.
set -m
"$VENV/bin/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module bigtrain.train "$@" &
job=$!
trap 'kill -TERM -- -$job 2>/dev/null' TERM INT
while true; do
    wait "$job"
    code=$?
    kill -0 "$job" 2>/dev/null || exit "$code"  # wait returned for a trapped signal: keep waiting
done
