#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher: pdsh logs in to every host of HOSTFILE over
# ssh and starts `slots` ranks on each. Run it on one of the nodes (usually the first).
#   launchers/multinode.sh HOSTFILE [OVERRIDES...]
#   GLOO_SOCKET_IFNAME=eth1 SSH_PORT=2222 launchers/multinode.sh hosts zero=stage3
# Before any rank starts, `bigtrain hosts` checks the hostfile (syntax, host names, duplicates), its
# slots against the config, and ssh to every host; a problem exits 2 with one paragraph.
# Environment:
#   MASTER_ADDR, MASTER_PORT  where the ranks meet (default: the hostfile's first host, port 29500)
#   SSH_PORT                  sshd's port on the hosts; other ssh options go in PDSH_SSH_ARGS_APPEND
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the network interface the collectives use (README)
#   FORWARD_ENV               names of more variables to pass to the ranks
#   VENV                      bigtrain's environment (default .venv), at the same path on every node
# The ranks see only the variables passed through DeepSpeed's env file (the ones below, the
# user's own ~/.deepspeed_env and ./.deepspeed_env, and DeepSpeed's own prefixes: PYTHON*, NCCL*
# on GPUs, ...): pdsh's ssh sessions start with a fresh login environment.
# SIGTERM/SIGINT reach the ranks on every node, which save a checkpoint and exit (code 75).
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 HOSTFILE [OVERRIDES...]" >&2
    exit 2
fi
hostfile=$(realpath -- "$1") || exit 2
shift
cd "$(dirname "$0")/.."
VENV=$(realpath -- "${VENV:-.venv}")
MASTER_ADDR=${MASTER_ADDR:-$(awk '{sub(/#.*/, "")} NF {print $1; exit}' "$hostfile" 2>/dev/null)}
MASTER_PORT=${MASTER_PORT:-29500}
ssh_port=(${SSH_PORT:+--ssh-port "$SSH_PORT"})

"$VENV/bin/python" -m bigtrain.cli hosts --master-addr "$MASTER_ADDR" "${ssh_port[@]}" "$hostfile" "$@" \
    || exit $?

# DeepSpeed reads the variables for the ranks from $DS_ENV_FILE in ~ and in the working directory;
# an absolute path names one file, written per launch so concurrent launches cannot mix them up.
env_file=$(mktemp "${TMPDIR:-/tmp}/bigtrain-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
cat ~/.deepspeed_env ./.deepspeed_env 2>/dev/null | grep '=' >> "$env_file"
# DeepSpeed puts these values into the remote shell's command line inside double quotes, where $, `, \
# and " would still be interpreted: such a value is refused rather than run on every node.
for name in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_DEBUG DS_ACCELERATOR \
            OMP_NUM_THREADS TORCH_EXTENSIONS_DIR HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
            TRANSFORMERS_OFFLINE CUDA_HOME CUDA_VISIBLE_DEVICES PYTORCH_CUDA_ALLOC_CONF \
            $(compgen -e | grep -E '^TORCH_NCCL_|^NCCL_' | sort -u) ${FORWARD_ENV:-}; do
    if [ -n "${!name+set}" ]; then
        case ${!name} in
            *[\$\`\\\"]*) echo "multinode.sh: \$$name contains a shell character (\$ \` \\ or \"), which the remote shell would interpret; set it without one" >&2; exit 2 ;;
        esac
        printf '%s=%s\n' "$name" "${!name}" >> "$env_file"
    fi
done
# The overrides travel in the env file, base64-encoded (letters, digits, + / =), not on the remote
# command line: pdsh hands that to a shell on every node, which would expand, split or run parts of
# them (DeepSpeed quotes only arguments with spaces). Every rank decodes exactly the bytes checked above.
printf 'BIGTRAIN_OVERRIDES=%s\n' "$("$VENV/bin/python" -m bigtrain.config.overrides --encode "$@")" >> "$env_file"
# The PATH the ranks' ninja and CUDA tools are found on, with this environment's bin/ first.
printf 'PATH=%s\n' "$VENV/bin:$PATH" | grep -v '[$`\\"]' >> "$env_file" || true
export DS_ENV_FILE=$env_file

# Signals: DeepSpeed's own handler for this launcher stops pdsh, after which the ranks die on their
# closed output without saving, and its remote kill command fails in 0.19.8 ("pkill: only one
# pattern can be provided"). So the launcher runs in a process group of its own, out of reach of
# signals meant for this script (Ctrl-C, launchers/restart.sh), and a SIGTERM/SIGINT here goes to
# the ranks themselves on every node, over ssh: the children of this job's launch processes (found
# by this job's master address and port, which no other running job can share). The ranks save,
# exit 75, and the launcher passes that on.
hosts=$(awk '{sub(/#.*/, "")} NF {print $1}' "$hostfile" | paste -sd, -)
# Anchored at the interpreter: pdsh, ssh and the remote shell carry the same words on their
# command lines, and their children must live on (the ranks' output and exit codes go through them).
launch_pattern="^[^ ]*python[^ ]* -u -m deepspeed\.launcher\.launch .*--master_addr=$MASTER_ADDR --master_port=$MASTER_PORT( |\$)"
stop_ranks() {
    echo "multinode.sh: stopping the ranks on $hosts (they save a checkpoint and exit)" >&2
    PDSH_RCMD_TYPE=ssh PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-}${SSH_PORT:+ -p $SSH_PORT}" \
        pdsh -S -w "$hosts" "pkill -TERM -P \"\$(pgrep -d, -f -- '$launch_pattern')\"" </dev/null >&2
}

# --no_ssh_check: the check above logged in to every host with the options pdsh will use, where
# DeepSpeed's own tries only the first host and without PDSH_SSH_ARGS_APPEND. --venv_script puts
# the environment's bin/ first on each node's PATH, so ranks find its ninja and compiled ops.
set -m
"$VENV/bin/deepspeed" --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --no_ssh_check ${SSH_PORT:+--ssh_port "$SSH_PORT"} --venv_script "$VENV/bin/activate" \
    --module bigtrain.train &
job=$!
trap stop_ranks TERM INT
while true; do
    wait "$job"
    code=$?
    kill -0 "$job" 2>/dev/null || exit "$code"  # wait returned for a trapped signal: keep waiting
done
