"""Gradient-communication options side by side: final loss, bytes per step and step time.

    python -m benchmarks.compression             # every option, 200 steps, 2 ranks: about 20 min on a 2-core CPU
    python -m benchmarks.compression --quick     # two options, a few steps: the code path (the test suite runs it)
    python -m benchmarks.compression --launcher "torchrun --nproc_per_node {ranks} --master_port {port} -m"

Every option trains the default model (tiny_llama) on the bundled corpus from the same initialisation
on the same batches. Final loss is the mean loss of the last 20 steps (one batch's loss is noisy; the
batches are the same for every option, so the comparison is paired); the target is a final loss at
most 3% above comm=none's at the same ZeRO stage. Bytes are metrics.jsonl's comm_bytes (DeepSpeed's
comms logger, both for DeepSpeed's exchange and bigtrain's), averaged over the steps after the
option's warm-up. Step time is the mean step_time_s after the first 10 steps.

`run_option` is the per-option runner: it needs only a command prefix that runs
`bigtrain.train OVERRIDES` on every rank of the job (a launcher, or a script starting one launcher
per node), so the same table can be measured with another launcher or world, e.g. ranks in network
namespaces behind a slow link. Results: benchmarks/results/compression-<device>-<date>.{json,md}.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from benchmarks.throughput import _commit, _versions, write_result
from bigtrain.distributed.process_group import free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
DEFAULT_LAUNCHER = f"{BIN / 'deepspeed'} --num_gpus {{ranks}} --master_port {{port}} --module"
LOSS_TARGET = 0.03  # final loss at most this much above comm=none's
LAST_STEPS = 20  # final loss: mean over this many last steps
STEADY_AFTER = 10  # step time: steps after this many


@dataclass
class Option:
    label: str
    overrides: list[str]
    baseline: str | None = None  # label of the comm=none run at the same ZeRO stage
    warmup_steps: int = 0
    extra: list[str] = field(default_factory=list)


def options(on_gpu: bool) -> list[Option]:
    zero0, zero3 = ["zero=stage0"], ["zero=stage3"]
    return [
        Option("none", zero0),
        Option("fp16_reduce", [*zero0, "comm=fp16_reduce"], "none"),
        Option("bf16_reduce", [*zero0, "comm=bf16_reduce"], "none"),
        Option("onebit", [*zero0, "comm=onebit"], "none", warmup_steps=20),
        Option("onebit, 60 warm-up steps", [*zero0, "comm=onebit", "comm.warmup_steps=60"], "none", warmup_steps=60),
        Option("powersgd (rank 4)", [*zero0, "comm=powersgd"], "none", warmup_steps=20),
        Option("local_sgd (every 8 steps)", [*zero0, "comm=local_sgd"], "none", warmup_steps=20),
        Option("local_sgd + Nesterov outer step (DiLoCo)", [*zero0, "comm=local_sgd", "comm.outer_optimizer=nesterov"],
               "none", warmup_steps=20),
        Option("none, ZeRO-3", zero3),
        # On a GPU the whole of ZeRO++; on a CPU the part that runs there.
        Option("zeropp" if on_gpu else "zeropp_hpz", [*zero3, "comm=zeropp" if on_gpu else "comm=zeropp_hpz"],
               "none, ZeRO-3"),
    ]


def run_option(overrides: list[str], launch_prefix: list[str], workdir: Path, warmup_steps: int = 0,
               env: dict | None = None, timeout: float = 3600) -> dict:
    """Train one option with `launch_prefix + ["bigtrain.train", *overrides]`; read its metrics.jsonl."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    command = [*launch_prefix, "bigtrain.train", *overrides, f"run_dir={run_dir}", "comm.count_bytes=true",
               "logging.interval=1",
               "logging.tensorboard=false", "checkpoint.save_final=false", "checkpoint.resume=never"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {shlex.join(command)}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    compressed = [r for r in records if r["step"] > warmup_steps] or records
    steady = [r for r in records if r["step"] > STEADY_AFTER] or records
    last = records[-LAST_STEPS:]
    return {
        "final_loss": sum(r["loss"] for r in last) / len(last),
        "bytes_per_step": sum(r["comm_bytes"] for r in compressed) / len(compressed),
        "bytes_by_op": compressed[-1]["comm_bytes_by_op"],
        "step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
        "steps": records[-1]["step"],
        "wall_s": wall,
        "losses": [r["loss"] for r in records],
        "step_times": [r["step_time_s"] for r in records],
    }


def launcher_prefix(template: str, ranks: int) -> list[str]:
    return shlex.split(template.format(ranks=ranks, port=free_port()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                        help="command prefix that runs a Python module on every rank; {ranks} and {port} "
                             "are filled in (default: %(default)s)")
    parser.add_argument("--only", nargs="+", help="labels of the options to run (and their baselines)")
    parser.add_argument("--quick", action="store_true", help="none and onebit, 6 short steps: the code path")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = options(device == "cuda")
    common = [f"train.max_steps={args.steps}"]
    if args.quick:
        chosen = [Option("none", ["zero=stage0"]),
                  Option("onebit", ["zero=stage0", "comm=onebit", "comm.warmup_steps=2"], "none", warmup_steps=2)]
        common = ["train.max_steps=6", "train.micro_batch_size=2", "train.seq_len=32", "scheduler.warmup_steps=2"]
    if args.only:
        wanted = set(args.only) | {o.baseline for o in chosen if o.label in args.only and o.baseline}
        chosen = [o for o in chosen if o.label in wanted]

    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-compression-"))
    rows = {}
    for option in chosen:
        result = run_option([*option.overrides, *common], launcher_prefix(args.launcher, args.ranks), workdir,
                            option.warmup_steps)
        result.update(overrides=option.overrides, warmup_steps=option.warmup_steps, baseline=option.baseline)
        if option.baseline in rows:
            base = rows[option.baseline]
            result["loss_vs_baseline"] = result["final_loss"] / base["final_loss"] - 1
            result["bytes_reduction"] = base["bytes_per_step"] / result["bytes_per_step"]
            result["target_met"] = result["loss_vs_baseline"] <= LOSS_TARGET
        rows[option.label] = result
        print(f"{option.label}: final loss {result['final_loss']:.4f}, {result['bytes_per_step'] / 1e6:.3f} MB/step, "
              f"{result['step_time_s'] * 1000:.0f} ms/step", flush=True)

    result = {
        "date": date.today().isoformat(), "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
            f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "versions": _versions(), "commit": _commit(), "ranks": args.ranks, "common_overrides": common,
        "launcher": args.launcher, "loss_target": LOSS_TARGET, "rows": rows,
    }
    print(markdown(result))
    if not args.quick:
        write_result(args.out, f"compression-{device}-{result['date']}", result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        f"# Gradient communication, {r['date']} ({r['device']})", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"tiny_llama (5.3M parameters) on the bundled corpus, {r['ranks']} ranks, default batch "
        f"({' '.join(r['common_overrides'])}). Final loss: mean of the last {LAST_STEPS} steps. Bytes: what "
        "each rank sends per step through DeepSpeed's collectives (comms logger, ring-algorithm bytes), "
        "after the option's warm-up. Target: final loss at most "
        f"{r['loss_target']:.0%} above comm=none's at the same ZeRO stage.", "",
        "| option | ZeRO | warm-up steps | final loss | vs none | bytes / step | fewer bytes | step time | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in r["rows"].items():
        zero = next(o.split("stage")[1] for o in row["overrides"] if o.startswith("zero="))
        versus = f"{row['loss_vs_baseline']:+.1%}" if "loss_vs_baseline" in row else "(baseline)"
        fewer = f"{row['bytes_reduction']:.1f}x" if "bytes_reduction" in row else ""
        target = ("met" if row["target_met"] else "**missed**") if "target_met" in row else ""
        lines.append(f"| {label} | {zero} | {row['warmup_steps']} | {row['final_loss']:.4f} | {versus} | "
                     f"{_mb(row['bytes_per_step'])} | {fewer} | {row['step_time_s'] * 1000:.0f} ms | {target} |")
    return "\n".join(lines) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    main()
