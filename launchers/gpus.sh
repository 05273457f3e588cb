# Sourced by the launchers: which GPUs a launch on this machine may use.
#   visible_gpus    prints the GPU ids this job may use, comma-separated ("" without GPUs): the
#                   entries of CUDA_VISIBLE_DEVICES when it is set (others' GPUs on a shared node stay
#                   untouched), else every GPU nvidia-smi lists
visible_gpus() {
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        return 0
    fi
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        printf '%s\n' "$CUDA_VISIBLE_DEVICES"
    else
        nvidia-smi -L | grep -c '^GPU' | awk '{ for (i = 0; i < $1; i++) printf "%s%d", (i ? "," : ""), i; print "" }'
    fi
}
