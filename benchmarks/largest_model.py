"""The largest model this machine can train: ZeRO-3 with CPU offload, and ZeRO-3 with NVMe offload.

    python -m benchmarks.largest_model                     # both; about 30 minutes on a 2-core CPU
    python -m benchmarks.largest_model --only cpu          # ZeRO-3 + CPU offload search only
    python -m benchmarks.largest_model --only nvme --nvme-path /mnt/fast/bigtrain-swap

Models are Llamas of the TinyLlama shape (width 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000),
scaled by their number of layers (44M parameters each). Every run is real: `deepspeed` launches the
ranks of `bigtrain.train` for a few steps on the bundled corpus, with no final checkpoint.

CPU offload: on a CPU machine "offloaded" states still live in RAM, so the limit is RAM. Two small
models are trained first; their peak memory (whole machine, MemTotal - MemAvailable, above the idle
baseline) gives memory per parameter, and the largest layer count predicted to fit in 90% of the RAM
that was available at the start is then trained to confirm it.

NVMe offload (offload=nvme offload.max_in_cpu=0): parameters, fp32 master weights, Adam moments and
gradients live in files under --nvme-path; RAM holds DeepSpeed's flat fp32 gradient partition (4
bytes per parameter per rank), one optimizer sub-group at a time and the parameters in flight. The
run trains a model whose fp32 weights plus Adam moments (12 bytes per parameter) exceed the
machine's RAM, which without NVMe could not even be held.

Reported per run: parameters, time to first step (process start to first finished step), seconds per
step after it, peak machine memory above baseline, peak RSS per rank.
Results: benchmarks/results/largest_model-<device>-<date>.{json,md}.
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from benchmarks.runs import launch_and_watch
from benchmarks.throughput import RESULTS, _commit, _versions, write_result

# q and o are 2048 x 2048; k and v 2048 x 256 (4 KV heads of 64); the MLP three 2048 x 5632 matrices.
LAYER_PARAMS = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632
EMBEDDING_PARAMS = 2 * 32000 * 2048  # input embedding and untied output head


def llama_overrides(layers: int) -> list[str]:
    return ["model=tiny_llama", f"model.name=llama_2048x{layers}", "model.hf_config.hidden_size=2048",
            "model.hf_config.intermediate_size=5632", f"model.hf_config.num_hidden_layers={layers}",
            "model.hf_config.num_attention_heads=32", "model.hf_config.num_key_value_heads=4",
            "model.hf_config.vocab_size=32000", "model.hf_config.tie_word_embeddings=false"]


def llama_params(layers: int) -> int:
    return layers * (LAYER_PARAMS + 2 * 2048) + EMBEDDING_PARAMS + 2048  # + RMSNorm weights


def train_once(layers: int, offload: list[str], ranks: int, steps: int, workdir: Path,
               swap_dir: Path | None = None) -> dict:
    """Train `steps` steps, watching the machine's memory and the ranks' RSS while it runs."""
    run_dir = workdir / f"layers{layers}-{time.monotonic_ns()}"
    overrides = [*llama_overrides(layers), "zero=stage3", *offload, "precision=fp32",
                 "train.micro_batch_size=1", "train.seq_len=128", f"train.max_steps={steps}",
                 "logging.interval=1", "logging.tensorboard=false", "checkpoint.save_final=false",
                 "checkpoint.resume=never", "fault.hang_timeout_s=1800"]
    run = launch_and_watch(overrides, ranks, run_dir, workdir / f"{run_dir.name}.log", swap_dir)
    result = {"layers": layers, "params": llama_params(layers), "ok": run["ok"], "exit_code": run["exit_code"],
              "peak_used_gb": run["peak_used_gb"], "peak_rss_per_rank_gb": max(run["peak_rss_gb"], default=0.0),
              "time_to_first_step_s": run["time_to_first_step_s"], "wall_s": run["wall_s"]}
    if swap_dir is not None:
        result["swap_files_gb"] = run["swap_files_gb"]
    if result["ok"]:
        records = run["records"]
        later = [r["step_time_s"] for r in records if r["step"] > 1]
        result["s_per_step"] = sum(later) / len(later) if later else records[-1]["step_time_s"]
        result["final_loss"] = records[-1]["loss"]
    else:
        result["log_tail"] = run["log_tail"]
    print(f"{layers} layers ({result['params'] / 1e9:.2f}B): {'ok' if result['ok'] else 'FAILED'}, "
          f"peak +{result['peak_used_gb']:.1f} GB, {result.get('s_per_step', float('nan')):.1f} s/step", flush=True)
    return result


def search_cpu_offload(ranks: int, workdir: Path, probe_layers: tuple[int, int]) -> dict:
    available = psutil.virtual_memory().available / 1e9
    probes = [train_once(n, ["offload=full"], ranks, 2, workdir) for n in probe_layers]
    if not all(p["ok"] for p in probes):
        return {"available_gb": available, "probes": probes, "largest": None}
    (n1, m1), (n2, m2) = [(p["params"], p["peak_used_gb"]) for p in probes]
    per_param = (m2 - m1) / (n2 - n1)  # bytes of RAM per parameter, in GB per parameter
    fixed = m1 - per_param * n1
    budget = 0.9 * available
    layers = max(probe_layers)
    while fixed + per_param * llama_params(layers + 1) <= budget:
        layers += 1
    largest = train_once(layers, ["offload=full"], ranks, 3, workdir)
    largest["predicted_gb"] = fixed + per_param * largest["params"]
    return {"available_gb": available, "bytes_per_param": per_param * 1e9, "fixed_gb": fixed,
            "probes": probes, "largest": largest}


def run_nvme(ranks: int, workdir: Path, nvme_path: Path, layers: int) -> dict:
    nvme_path.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(nvme_path).free / 1e9
    try:
        result = train_once(layers, ["offload=nvme", f"offload.nvme_path={nvme_path}", "offload.max_in_cpu=0"],
                            ranks, 3, workdir, swap_dir=nvme_path)
    finally:
        shutil.rmtree(nvme_path, ignore_errors=True)
    result["disk_free_gb"] = free_gb
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cpu", "nvme"])
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the CPU offload search")
    parser.add_argument("--nvme-ranks", type=int, default=2, help="ranks of the NVMe run")
    parser.add_argument("--probe-layers", type=int, nargs=2, default=(2, 6))
    parser.add_argument("--nvme-layers", type=int, default=47,
                        help="default 47: 2.20B parameters, 26.4 GB of fp32 weights + Adam moments (RAM: 25.8 GB)")
    parser.add_argument("--nvme-path", type=Path, default=Path(tempfile.gettempdir()) / "bigtrain-nvme")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-largest-"))
    ram_gb = psutil.virtual_memory().total / 1e9
    result = {"date": date.today().isoformat(), "device": "cpu",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {ram_gb:.1f} GB RAM",
              "versions": _versions(), "commit": _commit(), "ranks": args.ranks, "ram_gb": ram_gb}
    if args.only in (None, "cpu"):
        result["cpu_offload"] = search_cpu_offload(args.ranks, workdir, tuple(args.probe_layers))
    if args.only in (None, "nvme"):
        result["nvme_offload"] = run_nvme(args.nvme_ranks, workdir, args.nvme_path, args.nvme_layers)
        result["nvme_offload"]["ranks"] = args.nvme_ranks
    print(_markdown(result))
    write_result(args.out, f"largest_model-cpu-{result['date']}", result, _markdown(result))
    return result


def _row(label: str, r: dict) -> str:
    first = f"{r['time_to_first_step_s']:.0f} s" if r.get("time_to_first_step_s") else "-"
    step = f"{r['s_per_step']:.1f}" if r.get("s_per_step") else "-"
    status = "trains" if r["ok"] else f"failed (exit {r['exit_code']})"
    return (f"| {label} | {r['ranks']} | {r['layers']} | {r['params'] / 1e9:.2f}B | {12 * r['params'] / 1e9:.1f} GB | {status} | "
            f"{first} | {step} | {r['peak_used_gb']:.1f} GB | {r['peak_rss_per_rank_gb']:.1f} GB |")


def _markdown(r: dict) -> str:
    lines = [f"# Largest trainable model, {r['date']} ({r['device']})", "",
             f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}. ZeRO-3, fp32, micro-batch 1 x 128 "
             "tokens per rank. Llama of width 2048 (TinyLlama shape), scaled by layers.", "",
             "| offload | ranks | layers | parameters | fp32 weights + Adam (12 B/param) | result | time to first step | "
             "s/step after | peak machine memory above idle | peak RSS / rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cpu = r.get("cpu_offload")
    if cpu:
        for probe in cpu["probes"]:
            lines.append(_row("CPU (probe)", {**probe, "ranks": r["ranks"]}))
        if cpu["largest"]:
            lines.append(_row("CPU (largest predicted to fit)", {**cpu["largest"], "ranks": r["ranks"]}))
    if r.get("nvme_offload"):
        lines.append(_row("NVMe", r["nvme_offload"]))
    if cpu and cpu.get("bytes_per_param"):
        lines += ["", f"CPU offload: {cpu['bytes_per_param']:.1f} bytes of RAM per parameter measured between the "
                  f"probes (+{cpu['fixed_gb']:.1f} GB fixed); {cpu['available_gb']:.1f} GB were available at the start, "
                  f"90% of it was the budget."]
    if r.get("nvme_offload"):
        n = r["nvme_offload"]
        lines += ["", f"NVMe offload: swap files reached {n['swap_files_gb']:.1f} GB on a disk with "
                  f"{n['disk_free_gb']:.0f} GB free; the machine has {r['ram_gb']:.1f} GB of RAM."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
