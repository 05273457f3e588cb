#!/usr/bin/env bash
# One short check of bigtrain on a GPU machine: under 10 minutes on one H100/H200 (each stage has its own
# time limit, cut to what is left of the script's 10 minutes).
#
#   make setup && benchmarks/gpu_check.sh        # writes benchmarks/results/gpu-<date>.md
#
# Stages, each under its own `timeout`, each run whatever happened to the one before:
#   env          nvidia-smi, torch / CUDA / DeepSpeed / transformers versions, DeepSpeed's op report
#   default      the default job (what `make train` runs: launchers/local.sh) for 20 steps
#   llama_1b     llama_1b, bf16, seq 2048: with and without the step-time split (logging.step_breakdown):
#                tokens/s, MFU against the datasheet, peak memory, GPU use, from metrics.jsonl
#   zero3_resume ZeRO-3: 20 steps uninterrupted; 10 steps, saved, resumed to 20; the losses compared
#   export       bigtrain export of that run to a Hugging Face folder, then bigtrain sample from it
#   fp16_zero0   fp16 (loss scaling) at ZeRO-0
#   offload      ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeed's CPU Adam)
#   throughput   benchmarks/throughput.py's GPU mode (llama_1b, bf16), no sweep, one round
#   long_context benchmarks/long_context.py's GPU mode (llama_1b, bf16): plain data parallelism and every
#                lever at once (checkpointing, sequence parallelism with 2 GPUs, tiled MLP and loss) at
#                8192 tokens; the search for the longest length is left to a run of its own
# It installs nothing: what it needs is what `make setup` installed. Without a GPU the GPU stages say
# "skipped: no GPU"; GPU_CHECK_CPU=1 runs the stages that mean something on a CPU there too (the
# default job, ZeRO-3 resume, export and sample, offload: tiny models, fp32, 5 times the time limits),
# to check this script.
#
# Settings (environment): VENV (default .venv), GPU_CHECK_OUT (the report's path), GPU_CHECK_BUDGET_S
# (the script's seconds, default 600),
# GPU_CHECK_ONLY="stage stage ..." (run only these), GPU_CHECK_WORK (scratch folder; default a new one
# under /tmp, kept: run folders and logs of every stage).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PY=$REPO/$VENV/bin/python
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

# ------------------------------------------------------------------------------------ one stage
# `gpu_check.sh --stage NAME WORK` runs one stage: exit 0 passed, 99 skipped, anything else failed.
# A stage writes its key numbers (one line, markdown) to WORK/NAME.key and may add a section of
# details to WORK/NAME.details.

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
        && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

gpu_count() {
    "$PY" -c 'import torch; print(torch.cuda.device_count())'
}

skip() {  # skip REASON
    echo "skipped: $1" >"$KEY"
    echo "skipped: $1"
    exit 99
}

need_gpu() {  # need_gpu [cpu-ok]: skip without a GPU, unless the stage may run on a CPU and GPU_CHECK_CPU=1
    if has_gpu; then
        DEVICE=cuda
        NPROC=$(gpu_count)
        return
    fi
    if [ "${1:-}" = cpu-ok ] && [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
        DEVICE=cpu
        NPROC=2
        return
    fi
    skip "no GPU"
}

launcher() {  # the deepspeed launcher for NPROC ranks on this machine's visible GPUs (or CPU), on a free port
    local devices=(--num_gpus "$NPROC")
    if [ "$DEVICE" = cuda ]; then
        source launchers/gpus.sh
        local gpus
        gpus=$(visible_gpus | cut -d, -f"1-$NPROC")
        case $gpus in
            *[!0-9,]*) echo "CUDA_VISIBLE_DEVICES=$gpus names GPUs by UUID; give their indices" >"$KEY"; return 1 ;;
        esac
        devices=(--include "localhost:$gpus")
    fi
    local port
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$VENV/bin/deepspeed" "${devices[@]}" --master_port "$port" --module bigtrain.train "$@"
}

train() {  # train RUN_DIR OVERRIDES...: NPROC ranks, the output added to RUN_DIR.log
    local run_dir=$1
    shift
    launcher "run_dir=$run_dir" "train.device=$DEVICE" logging.tensorboard=false fault.hang_timeout_s=600 "$@" \
        >>"$run_dir.log" 2>&1
    local code=$?
    if [ $code -ne 0 ]; then
        echo "training in $run_dir failed (exit $code); the end of its log:"
        tail -n 30 "$run_dir.log"
        local why
        why=$(grep -E "Error|error:|bigtrain:" "$run_dir.log" | grep -v sigkill_handler | tail -n 1 | cut -c1-300)
        echo "training $(basename "$run_dir") failed (exit $code): $why" >"$KEY"
    fi
    return $code
}

summary() {  # summary RUN_DIR [FROM_STEP]: key numbers of a run's metrics.jsonl, as one markdown line
    "$PY" - "$1" "${2:-2}" <<'EOF'
import json, sys
from pathlib import Path
records = [json.loads(l) for l in Path(sys.argv[1], "metrics.jsonl").read_text().splitlines() if l.strip()]
later = [r for r in records if r["step"] >= int(sys.argv[2])] or records
mean = lambda key: (sum(r[key] for r in later if r.get(key) is not None) / max(1, sum(1 for r in later if r.get(key) is not None))
                    if any(r.get(key) is not None for r in later) else None)
parts = [f"{records[-1]['step']} steps", f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}",
         f"{mean('tokens_per_s'):,.0f} tokens/s", f"step {mean('step_time_s') * 1000:.0f} ms"]
if mean("mfu") is not None:
    parts.append(f"MFU {mean('mfu'):.1%}")
parts.append(f"peak memory {max(r['mem_gb'] for r in records):.1f} GB/rank")
if mean("gpu_util") is not None:
    parts.append(f"GPU use {mean('gpu_util'):.0f}%")
skipped = records[-1].get("skipped_steps")
if skipped:
    parts.append(f"{skipped} skipped steps")
print(", ".join(parts))
EOF
}

stage_env() {
    {
        echo "host: $(hostname), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB RAM", $2 / 1e6}' /proc/meminfo)"
        if command -v nvidia-smi >/dev/null 2>&1; then
            nvidia-smi || true
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        else
            echo "nvidia-smi: not found"
        fi
        echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} CUDA_HOME=${CUDA_HOME-<unset>} nvcc: $(command -v nvcc || echo none)"
        "$PY" - <<'EOF'
import torch, deepspeed, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
EOF
        if "$PY" -m bigtrain.cli --help 2>/dev/null | grep -qw env; then
            "$PY" -m bigtrain.cli env
        fi
        "$PY" -m bigtrain.cli config --show deepspeed >/dev/null && echo "bigtrain config: the default config composes"
        timeout 30 "$VENV/bin/ds_report" 2>&1 | tail -n 40 || true
    } 2>&1 | tee "$WORK/env.details.txt"
    versions=$("$PY" -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")' 2>/dev/null | tail -n 1)
    if has_gpu; then
        gpus=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c | sed 's/^ *//' | paste -sd ';' -)
        echo "$gpus; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1); $versions" >"$KEY"
    else
        echo "no GPU visible to torch; $versions" >"$KEY"
    fi
}

stage_default() {  # what `make train` runs: launchers/local.sh (port 29500), the default config; 20 steps
    need_gpu cpu-ok
    NPROC=$NPROC VENV=$VENV launchers/local.sh "run_dir=$WORK/default" train.max_steps=20 logging.interval=5 \
        checkpoint.save_final=false >"$WORK/default.log" 2>&1 || { tail -n 30 "$WORK/default.log"; return 1; }
    echo "$NPROC rank(s), $DEVICE: $(summary "$WORK/default" 5)" >"$KEY"
}

stage_llama_1b() {
    need_gpu
    local common=(model=llama_1b precision=bf16 model.attn_implementation=sdpa train.seq_len=2048
                  train.micro_batch_size=4 train.max_steps=20 logging.interval=5 checkpoint.save_final=false
                  checkpoint.resume=never eval.interval=0)
    train "$WORK/llama_1b-split" "${common[@]}" logging.step_breakdown=true || return 1
    train "$WORK/llama_1b-nosplit" "${common[@]}" logging.step_breakdown=false || return 1
    with=$(summary "$WORK/llama_1b-split" 10)
    without=$(summary "$WORK/llama_1b-nosplit" 10)
    cost=$("$PY" - "$WORK/llama_1b-split" "$WORK/llama_1b-nosplit" <<'EOF'
import json, sys
from pathlib import Path
def tps(d):
    rs = [json.loads(l) for l in Path(d, "metrics.jsonl").read_text().splitlines() if l.strip()]
    rs = [r for r in rs if r["step"] >= 10]
    return sum(r["tokens_per_s"] for r in rs) / len(rs)
print(f"{1 - tps(sys.argv[1]) / tps(sys.argv[2]):+.1%}")
EOF
)
    echo "$NPROC GPU(s), micro-batch 4 x 2048, steps 10-20. With the step-time split: $with. Without: $without. Throughput cost of the split: $cost" >"$KEY"
}

stage_zero3_resume() {
    need_gpu cpu-ok
    local precision=bf16
    [ "$DEVICE" = cpu ] && precision=fp32
    local common=(zero=stage3 "precision=$precision" scheduler=constant train.micro_batch_size=4 logging.interval=1
                  eval.interval=0)
    train "$WORK/z3-whole" "${common[@]}" train.max_steps=20 checkpoint.resume=never checkpoint.save_final=false || return 1
    train "$WORK/z3-resumed" "${common[@]}" train.max_steps=10 checkpoint.resume=never || return 1
    train "$WORK/z3-resumed" "${common[@]}" train.max_steps=20 checkpoint.resume=auto || return 1
    "$PY" - "$WORK/z3-whole" "$WORK/z3-resumed" "$KEY" "$NPROC" "$precision" <<'EOF'
import json, sys
from pathlib import Path
def losses(d):
    rs = [json.loads(l) for l in Path(d, "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rs}
whole, resumed = losses(sys.argv[1]), losses(sys.argv[2])
steps = list(range(11, 21))
missing = [s for s in steps if s not in whole or s not in resumed]
if missing:
    Path(sys.argv[3]).write_text(f"steps {missing} missing from metrics.jsonl\n")
    sys.exit(1)
diff = max(abs(whole[s] - resumed[s]) for s in steps)
same = all(whole[s] == resumed[s] for s in steps)
Path(sys.argv[3]).write_text(
    f"{sys.argv[4]} rank(s), {sys.argv[5]}: steps 11-20 after resuming from step 10 vs uninterrupted: max |loss diff| "
    f"{diff:.2e} ({'bitwise equal' if same else 'not bitwise equal'}); loss at 20: {whole[20]:.4f} vs {resumed[20]:.4f}\n")
sys.exit(0 if diff <= 1e-3 else 1)
EOF
}

stage_export() {
    need_gpu cpu-ok
    [ -f "$WORK/z3-resumed/config.yaml" ] || { echo "no ZeRO-3 run to export (stage zero3_resume failed or was skipped)" >"$KEY"; return 1; }
    rm -rf "$WORK/export"
    "$PY" -m bigtrain.cli export "$WORK/z3-resumed" "$WORK/export" || return 1
    text=$("$PY" -m bigtrain.cli sample "$WORK/z3-resumed" --prompt "The hacker" --max-new-tokens 16) || return 1
    "$PY" - "$WORK/export" <<'EOF' || return 1
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 2, 3, 4]])
assert torch.isfinite(model(input_ids=ids).logits).all()
print(f"exported model loads with transformers: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
      f"{next(model.parameters()).dtype}")
EOF
    size=$(du -sh "$WORK/export" | cut -f1)
    shown=$("$PY" -c 'import sys; print(repr(sys.argv[1])[:120])' "$text")
    echo "exported ($size) and loaded with transformers; bigtrain sample (greedy, 16 tokens): $shown" >"$KEY"
}

stage_fp16_zero0() {
    need_gpu
    train "$WORK/fp16" zero=stage0 precision=fp16 train.max_steps=30 logging.interval=5 checkpoint.save_final=false \
        checkpoint.resume=never eval.interval=0 || return 1
    echo "$NPROC GPU(s): $(summary "$WORK/fp16" 10)" >"$KEY"
}

stage_offload() {
    need_gpu cpu-ok
    local extra=(precision=bf16 model=gpt2_small train.seq_len=512 train.micro_batch_size=8)
    [ "$DEVICE" = cpu ] && extra=(precision=fp32)
    train "$WORK/offload" zero=stage2 offload=optimizer "${extra[@]}" train.max_steps=10 logging.interval=2 \
        checkpoint.save_final=false checkpoint.resume=never eval.interval=0 || return 1
    echo "$NPROC rank(s), $DEVICE, ${extra[*]}: $(summary "$WORK/offload" 4)" >"$KEY"
}

# run_benchmark NAME ARGS...: `python -m benchmarks.NAME ARGS` writing into WORK/NAME (its log in WORK/NAME.log,
# the last lines shown on failure); its markdown becomes the stage's details, and RESULT_JSON names its JSON.
run_benchmark() {
    local name=$1 md
    shift
    "$PY" -m "benchmarks.$name" "$@" --out "$WORK/$name" >"$WORK/$name.log" 2>&1 \
        || { tail -n 30 "$WORK/$name.log"; return 1; }
    md=$(ls "$WORK/$name/$name"-cuda-*.md | head -n 1)
    cp "$md" "$WORK/$name.details"
    RESULT_JSON=${md%.md}.json
}

stage_throughput() {
    need_gpu
    run_benchmark throughput --no-sweep --repeats 1 --warmup 10 --steps 10 || return 1
    "$PY" - "$RESULT_JSON" >"$KEY" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
b = r["comparison"]["bigtrain"]
print(f"{r['ranks']} GPU(s), {r['model']} micro-batch {r['micro_batch']} x {r['seq_len']}: bigtrain {b['tokens_per_s']:,.0f} tokens/s, "
      f"MFU {b['mfu']:.1%}, {b['peak_mem_gb']:.1f} GB; " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
EOF
}

stage_long_context() {
    need_gpu
    run_benchmark long_context --device cuda --setups 1 4 --no-search || return 1
    "$PY" - "$RESULT_JSON" >"$KEY" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
parts = []
for name, row in r["setups"].items():
    fixed, search = row["fixed"], row.get("search") or {}
    if fixed["status"] != "ok":
        parts.append(f"{name}: {fixed['status']} at {r['fixed_len']}")
        continue
    longest = search.get("longest")
    bound = "" if search.get("first_failing") else ">= "
    parts.append(f"{name}: {fixed.get('device_mem_gb', 0):.1f} GB, {fixed['tokens_per_s']:,.0f} tokens/s at {r['fixed_len']}"
                 + (f", longest {bound}{longest}" if longest else ""))
print("; ".join(parts))
EOF
}

if [ "${1:-}" = --stage ]; then
    NAME=$2
    WORK=$3
    KEY=$WORK/$NAME.key
    "stage_$NAME"
    exit $?
fi

# ------------------------------------------------------------------------------------ all stages
STAGES=(env default llama_1b zero3_resume export fp16_zero0 offload throughput long_context)
# seconds each stage may take; the whole script stops starting stages after BUDGET seconds
declare -A LIMIT=([env]=60 [default]=60 [llama_1b]=130 [zero3_resume]=90 [export]=40 [fp16_zero0]=45
                  [offload]=60 [throughput]=110 [long_context]=130)
BUDGET=${GPU_CHECK_BUDGET_S:-600}
if [ "${GPU_CHECK_CPU:-0}" = 1 ] && ! has_gpu; then  # CPU ranks start and step far slower: more time each
    for name in "${STAGES[@]}"; do LIMIT[$name]=$((LIMIT[$name] * 5)); done
    BUDGET=$((BUDGET * 5))
fi
DATE=$(date +%F)
OUT=${GPU_CHECK_OUT:-$REPO/benchmarks/results/gpu-$DATE.md}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/bigtrain-gpu-check.XXXXXX)}
mkdir -p "$WORK" "$(dirname "$OUT")"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
STARTED=$SECONDS
declare -A STATUS SECS

write_report() {
    {
        echo "# GPU check, $DATE"
        echo
        echo "Machine: $(cat "$WORK/env.key" 2>/dev/null || echo unknown). Host: $(hostname), $(nproc) cores. Commit $COMMIT."
        echo "Script: benchmarks/gpu_check.sh, $(( (SECONDS - STARTED) / 60 )) min $(( (SECONDS - STARTED) % 60 )) s in all."
        echo "Run folders and logs: $WORK."
        echo
        echo "| stage | status | time | key numbers |"
        echo "|---|---|---|---|"
        for name in "${STAGES[@]}"; do
            [ -n "${STATUS[$name]:-}" ] || continue
            key=$(tr '\n|' ' /' <"$WORK/$name.key" 2>/dev/null)
            echo "| $name | ${STATUS[$name]} | ${SECS[$name]} s | ${key:-} |"
        done
        for name in "${STAGES[@]}"; do
            if [ -f "$WORK/$name.details" ]; then
                echo
                echo "## $name"
                echo
                sed 's/^#/##/' "$WORK/$name.details"
            fi
        done
    } >"$OUT"
}

for name in "${STAGES[@]}"; do
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$name" != env ] && ! [[ " $GPU_CHECK_ONLY " == *" $name "* ]]; then
        continue
    fi
    rm -f "$WORK/$name.key"
    left=$((BUDGET - (SECONDS - STARTED)))
    if [ "$left" -lt 20 ]; then
        echo "skipped: the script's $BUDGET s were spent" >"$WORK/$name.key"
        STATUS[$name]=skipped
        SECS[$name]=0
        echo "== $name: skipped (the script's $BUDGET s were spent)"
        write_report
        continue
    fi
    [ "${LIMIT[$name]}" -le "$left" ] || LIMIT[$name]=$left
    echo "== $name (at most ${LIMIT[$name]} s)"
    begin=$SECONDS
    # on timeout, TERM reaches the stage's processes: launchers/local.sh passes it on to its ranks, the
    # benchmarks end theirs; KILL follows 20 s later
    timeout --kill-after=20 "${LIMIT[$name]}" "$0" --stage "$name" "$WORK" 2>&1 | tee "$WORK/$name.out"
    code=${PIPESTATUS[0]}
    SECS[$name]=$((SECONDS - begin))
    case $code in
        0) STATUS[$name]=passed ;;
        99) STATUS[$name]=skipped ;;
        124 | 137) STATUS[$name]="**timed out** (${LIMIT[$name]} s)" ;;
        *) STATUS[$name]="**failed** (exit $code)"
           [ -s "$WORK/$name.key" ] || tail -n 3 "$WORK/$name.out" | tr '\n' ' ' >"$WORK/$name.key" ;;
    esac
    echo "== $name: ${STATUS[$name]} in ${SECS[$name]} s: $(cat "$WORK/$name.key" 2>/dev/null)"
    write_report
done
echo "wrote $OUT"
