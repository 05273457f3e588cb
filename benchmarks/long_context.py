"""Long sequences: what activation checkpointing, Ulysses sequence parallelism and ALST tiling buy, one
on top of the other, on 2 ranks.

    python -m benchmarks.long_context                  # about 40 minutes on a 2-core CPU
    python -m benchmarks.long_context --quick          # every lever at once, a tiny model, no search (tests)
    python -m benchmarks.long_context --device cuda    # llama_1b, bf16, every visible GPU (up to 2)

Four setups, each adding one lever to the one before:
  1. data parallel        every rank trains whole sequences of its own (ZeRO-2)
  2. + checkpointing      train.activation_checkpointing=full
  3. + sequence parallel  parallel.sequence=2: each sequence split over the 2 ranks (Ulysses)
  4. + tiled MLP and loss train.tiled_mlp=N train.tiled_loss=N, N = the rank's share of the sequence
                          in pieces of --tile tokens

First every setup trains 3 steps at a fixed seq_len (--fixed-len): peak memory per rank and tokens/s.
Then each searches for the longest seq_len that trains 3 steps: doubling from the fixed length until a
run fails for memory, then narrowing the bracket [longest that trained, shortest that did not] to
--granularity tokens, or an eighth of the longest that trained where that is coarser. Each probe inside
the bracket is where a straight line through the two longest passing runs' memory meets the limit
(rounded down to the granularity), or the midpoint until two runs have passed: a bisection's bracket in
fewer runs. The searches share a time budget (--budget-min, the whole benchmark's): each setup gets an
equal share of what is left. A run expected to outlast its setup's share is not started, unless the
memory line says it will not fit (it then fails within its first step); a setup whose budget ran out
reports "at least" its longest passing length, or its bracket as it stands.

CPU: "fits" means the ranks' resident memory together stays under 90% of the memory available when the
benchmark started (the machine's 24 GiB less what other programs hold); a run that goes over is killed
at once (benchmarks/runs.py), so that neither the kernel's OOM killer nor other programs on the machine
are involved. The model: a Llama of 8 layers, width 256 (4 heads of 64), MLP 688, with Llama 3's
128,256-token vocabulary (untied output head, 72M parameters), fp32, sdpa attention: narrow enough that a
step at the memory limit takes a minute rather than an hour on two cores, and with the vocabulary's
logits, as in small Llama 3 models, most of the activation memory per token.
GPU (--device cuda): model=llama_1b (1.2B parameters, tied output head) in bf16, sdpa attention
(flash_attention_2 when flash-attn is installed), 8192 tokens fixed; "fits" means no CUDA out-of-memory
error; memory per rank is the device's peak allocation (metrics.jsonl). With one GPU, setup 3 is skipped and setup 4 tiles without
sequence parallelism.

Reported per setup: peak memory per rank and tokens/s at the fixed length, the longest length that
trained 3 steps, the shortest that failed, every run with its outcome, and the length the passing
runs' memory extrapolates to (a line, not a measurement).
Results: benchmarks/results/long_context-<device>-<date>.{json,md}.
"""

import argparse
import importlib.util
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from benchmarks.runs import launch_and_watch
from benchmarks.throughput import RESULTS, _commit, _versions, write_result

CPU_MODEL = ["model=tiny_llama", "model.name=llama_8x256_v128k", "model.hf_config.hidden_size=256",
             "model.hf_config.intermediate_size=688", "model.hf_config.num_hidden_layers=8",
             "model.hf_config.num_attention_heads=4", "model.hf_config.num_key_value_heads=4",
             "model.hf_config.vocab_size=128256", "model.hf_config.tie_word_embeddings=false"]
QUICK_MODEL = ["model=tiny_llama", "model.name=llama_8x64", "model.hf_config.hidden_size=64",
               "model.hf_config.intermediate_size=172", "model.hf_config.num_hidden_layers=8",
               "model.hf_config.num_attention_heads=4", "model.hf_config.num_key_value_heads=4"]
GPU_MODEL = ["model=llama_1b"]
SETUPS = ["data parallel", "+ activation checkpointing", "+ sequence parallel 2", "+ tiled MLP and loss"]
STEPS = 3
MEMORY_EXITS = {-9, 137, 247}  # SIGKILL, as the kernel's OOM killer sends it, seen through the launcher
MEMORY_WORDS = ("out of memory", "MemoryError", "Cannot allocate memory", "OutOfMemoryError")


def setup_overrides(setup: str, seq_len: int, tile: int, sequence: int = 2) -> list[str]:
    """The overrides of a setup (each adds to the ones before it) at `seq_len`; `sequence=1` (one rank)
    leaves sequence parallelism out."""
    level = SETUPS.index(setup)
    overrides = []
    if level >= 1:
        overrides.append("train.activation_checkpointing=full")
    if level >= 2 and sequence > 1:
        overrides.append(f"parallel.sequence={sequence}")
    if level >= 3:
        local = seq_len // sequence
        pieces = max(2, math.ceil(local / tile))
        overrides += [f"train.tiled_mlp={pieces}", f"train.tiled_loss={pieces}"]
    return overrides


class Trials:
    """Runs of one benchmark: the model, the device, the memory rules, a working folder."""

    def __init__(self, model: list[str], device: str, ranks: int, tile: int, workdir: Path,
                 memory_budget_gb: float | None, min_available_gb: float | None):
        self.model, self.device, self.ranks, self.tile, self.workdir = model, device, ranks, tile, workdir
        self.sequence = 2 if ranks >= 2 else 1
        self.memory_budget_gb, self.min_available_gb = memory_budget_gb, min_available_gb
        if device == "cuda":
            flash = importlib.util.find_spec("flash_attn") is not None
            self.attention = "flash_attention_2" if flash else "sdpa"
            self.precision = "bf16"
        else:
            self.attention, self.precision = "sdpa", "fp32"

    def overrides(self, setup: str, seq_len: int, steps: int) -> list[str]:
        return [*self.model, f"model.attn_implementation={self.attention}",
                f"model.hf_config.max_position_embeddings={max(seq_len, 8192)}", f"precision={self.precision}",
                f"train.device={self.device}", "zero=stage2", "train.micro_batch_size=1", "train.grad_accum=1",
                f"train.seq_len={seq_len}", f"train.max_steps={steps}", "logging.interval=1",
                "logging.tensorboard=false", "eval.interval=0", "checkpoint.save_final=false",
                "checkpoint.resume=never", "fault.hang_timeout_s=3600", "fault.collective_timeout_s=3600",
                *setup_overrides(setup, seq_len, self.tile, self.sequence)]

    def __call__(self, setup: str, seq_len: int, deadline_s: float | None, steps: int = STEPS) -> dict:
        """Train `steps` steps of `setup` at `seq_len`: status ok, memory, time or error, with what was measured."""
        from bigtrain.api.training import deepspeed_devices

        run_dir = self.workdir / f"{SETUPS.index(setup)}-{seq_len}-{time.monotonic_ns()}"
        run = launch_and_watch(self.overrides(setup, seq_len, steps), self.ranks, run_dir,
                               self.workdir / f"{run_dir.name}.log",
                               devices=deepspeed_devices(self.ranks, self.device == "cuda"),
                               memory_budget_gb=self.memory_budget_gb, min_available_gb=self.min_available_gb,
                               deadline_s=deadline_s, interval_s=0.2)
        records = run["records"]
        trial = {"seq_len": seq_len, "status": "ok" if run["ok"] and len(records) >= steps else "error",
                 "wall_s": run["wall_s"], "time_to_first_step_s": run["time_to_first_step_s"],
                 "peak_rss_gb": run["peak_rss_gb"], "steps_done": len(records)}
        if records:
            trial["device_mem_gb"] = max(r["mem_gb"] for r in records)  # rank 0: RSS on the CPU, allocated on a GPU
        if run["killed"]:
            trial["status"] = "time" if "time limit" in run["killed"] else "memory"
            trial["why"] = run["killed"]
        elif not run["ok"]:
            tail = run["log_tail"]
            memory = run["exit_code"] in MEMORY_EXITS or any(word in tail for word in MEMORY_WORDS)
            trial["status"] = "memory" if memory else "error"
            trial["why"] = f"exit {run['exit_code']}: " + " ".join(tail.split()[-60:])
        if trial["status"] == "ok":
            timed = [r for r in records if r["step"] > 1] or records
            step_time = sum(r["step_time_s"] for r in timed) / len(timed)
            tokens_per_step = round(records[0]["tokens_per_s"] * records[0]["step_time_s"])
            first = records[0]["step_time_s"]
            trial.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                         tokens_per_step=tokens_per_step, startup_s=max(0.0, (run["time_to_first_step_s"] or first) - first),
                         memory_gb=self.job_memory_gb(trial), final_loss=records[-1]["loss"])
        print(f"  {setup}, seq_len {seq_len}: {trial['status']}"
              + (f", {trial['tokens_per_s']:,.0f} tokens/s, peak per rank "
                 f"{', '.join(f'{g:.2f}' for g in self.rank_peaks(trial))} GB" if trial["status"] == "ok" else "")
              + (f" ({trial['why'][:200]})" if trial.get("why") else "") + f" [{trial['wall_s']:.0f} s]", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        return trial

    def rank_peaks(self, trial: dict) -> list[float]:
        """Peak memory of each rank: resident memory on the CPU; on a GPU the device's peak allocation
        (rank 0's, which metrics.jsonl records; the ranks of these setups hold alike)."""
        if self.device == "cuda":
            return [trial.get("device_mem_gb", 0.0)] * self.ranks
        return trial["peak_rss_gb"]

    def job_memory_gb(self, trial: dict) -> float:
        """What the memory limit applies to: all ranks' peaks together on the CPU (one machine's RAM), the
        largest rank's on a GPU (each rank its own device)."""
        peaks = self.rank_peaks(trial)
        return sum(peaks) if self.device == "cpu" else max(peaks, default=0.0)


def _memory_line(runs: list[dict]) -> tuple[float, float] | None:
    """(intercept, slope) of the straight line through the two longest passing runs' memory, in GB."""
    points = sorted({r["seq_len"]: r["memory_gb"] for r in runs if r["status"] == "ok"}.items())
    if len(points) < 2:
        return None
    (x1, y1), (x2, y2) = points[-2], points[-1]
    slope = (y2 - y1) / (x2 - x1)
    return (y2 - slope * x2, slope) if slope > 0 else None


def predicted_limit(runs: list[dict], limit_gb: float | None) -> float | None:
    """The seq_len at which the memory line of the passing runs reaches `limit_gb`."""
    line = _memory_line(runs)
    if limit_gb is None or line is None:
        return None
    intercept, slope = line
    return (limit_gb - intercept) / slope


def search(trial, first: dict, *, granularity: int, max_len: int, deadline: float, limit_gb: float | None,
           clock=time.monotonic) -> dict:
    """The longest seq_len that trains: doubling from the passing run `first` until a run fails for memory,
    then narrowing the bracket to `granularity`, or an eighth of the longest passing length where that is
    coarser (each probe where the memory line predicts the limit, else the midpoint). `trial(seq_len,
    seconds_left)` runs one length. A run that would outlast `deadline` is not started, unless the memory
    line says it will not fit (it then fails early, within its first step)."""
    runs = [first]
    if first["status"] != "ok":
        return {"longest": None, "first_failing": first["seq_len"] if first["status"] == "memory" else None,
                "stopped": first["status"], "runs": runs, "predicted_by_memory": None}
    lo, hi, stopped = first["seq_len"], None, None

    def worth_starting(length: int) -> bool:
        ref = max((r for r in runs if r["status"] == "ok" and r["seq_len"] <= length), key=lambda r: r["seq_len"])
        # attention grows with the square of the length: an upper bound for the rest
        expected = ref["startup_s"] + STEPS * ref["step_time_s"] * (length / ref["seq_len"]) ** 2
        if clock() + expected <= deadline:
            return True
        limit = predicted_limit(runs, limit_gb)
        return limit is not None and length > limit and clock() + ref["startup_s"] < deadline

    def run(length: int) -> str | None:
        nonlocal lo, hi
        if not worth_starting(length):
            return "time"
        result = trial(length, max(1.0, deadline - clock()))
        runs.append(result)
        if result["status"] == "ok":
            lo = length
        elif result["status"] == "memory":
            hi = length
        else:
            return result["status"]
        return None

    length = lo * 2
    while hi is None and stopped is None:
        if length > max_len:
            stopped = "max_len"
            break
        stopped = run(length)
        length *= 2
    while stopped is None and hi is not None and hi - lo > max(granularity, lo // 8 // granularity * granularity):
        guess = predicted_limit(runs, limit_gb)
        probe = (lo + hi) / 2 if guess is None else guess
        probe = int(probe // granularity * granularity)
        probe = min(max(probe, lo + granularity), hi - granularity)
        stopped = run(probe)
    return {"longest": lo, "first_failing": hi, "stopped": stopped, "runs": runs,
            "predicted_by_memory": predicted_limit(runs, limit_gb)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, help="default: 2 on the CPU, the visible GPUs (at most 2) on CUDA")
    parser.add_argument("--fixed-len", type=int, help="seq_len of the memory and tokens/s comparison (default: "
                        "2048 on the CPU, 8192 on a GPU)")
    parser.add_argument("--granularity", type=int, help="search resolution in tokens (default: 512 CPU, 2048 GPU)")
    parser.add_argument("--max-len", type=int, default=1 << 20, help="longest seq_len tried")
    parser.add_argument("--tile", type=int, default=512, help="tokens per piece of the tiled MLP and loss")
    parser.add_argument("--budget-min", type=float, help="time budget of the whole benchmark in minutes "
                        "(default: 38 on the CPU, 10 on a GPU)")
    parser.add_argument("--setups", nargs="+", type=int, choices=range(1, len(SETUPS) + 1),
                        help="which setups to run, by number (default: all)")
    parser.add_argument("--no-search", action="store_true", help="the fixed length only")
    parser.add_argument("--quick", action="store_true", help="a tiny model at 256 tokens, setup 4 (every lever), "
                        "2 steps, no search: checks the code path")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    started = time.monotonic()
    on_gpu = args.device == "cuda"
    if on_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("long_context --device cuda: no CUDA device is visible here (torch.cuda.is_available() "
                             "is False); run it on a GPU machine, or without --device for the CPU benchmark.")
        args.ranks = args.ranks or min(2, torch.cuda.device_count())
    args.ranks = args.ranks or 2
    args.fixed_len = args.fixed_len or (8192 if on_gpu else 2048)
    args.granularity = args.granularity or (2048 if on_gpu else 512)
    args.budget_min = args.budget_min or (10.0 if on_gpu else 38.0)
    model = GPU_MODEL if on_gpu else CPU_MODEL
    steps = STEPS
    chosen = [SETUPS[n - 1] for n in (args.setups or range(1, len(SETUPS) + 1))]
    if args.quick:
        model, args.fixed_len, steps, args.no_search, args.tile = QUICK_MODEL, 256, 2, True, 64
        chosen = [SETUPS[3]] if not args.setups else chosen  # every lever at once: one launch
    # one rank: no sequence parallelism; setup 3 is then setup 2, and setup 4 tiles without it
    skipped = {s: f"parallel.sequence=2 needs 2 ranks, {args.ranks} here" for s in chosen
               if SETUPS.index(s) == 2 and args.ranks < 2}
    chosen = [s for s in chosen if s not in skipped]

    vm = psutil.virtual_memory()
    budget_gb = None if on_gpu else 0.9 * vm.available / 1e9
    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-long-context-"))
    trials = Trials(model, args.device, args.ranks, args.tile, workdir, budget_gb,
                    None if on_gpu else max(0.5, 0.03 * vm.total / 1e9))
    deadline_all = started + 60 * args.budget_min
    rows = {}
    try:
        # First every setup at the fixed length (the comparison that must not be cut short), then the searches,
        # each with an equal share of the time left.
        for setup in chosen:
            print(f"{setup}, at {args.fixed_len} tokens:", flush=True)
            fixed = trials(setup, args.fixed_len, None, steps)
            overrides = setup_overrides(setup, args.fixed_len, args.tile, trials.sequence)
            rows[setup] = {"overrides": overrides, "fixed": fixed}
        if not args.no_search:
            for number, setup in enumerate(chosen):
                setup_deadline = time.monotonic() + (deadline_all - time.monotonic()) / (len(chosen) - number)
                until = max(0.0, setup_deadline - started) / 60
                print(f"{setup}, longest seq_len (until {until:.0f} min into the run):", flush=True)
                rows[setup]["search"] = search(lambda length, left, s=setup: trials(s, length, left),
                                               rows[setup]["fixed"], granularity=args.granularity,
                                               max_len=args.max_len, deadline=setup_deadline, limit_gb=budget_gb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    from bigtrain.components.models import model_shape
    from bigtrain.config import compose

    shape = model_shape(compose([*model, "run_dir=/tmp/unused"]).model)
    result = {
        "date": date.today().isoformat(), "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {vm.total / 1e9:.1f} GB RAM"
                   + (f", {args.ranks} x {torch.cuda.get_device_name()}" if on_gpu else ""),
        "versions": _versions(), "commit": _commit(), "quick": args.quick, "model": model,
        "params": shape.parameters, "layers": shape.num_layers, "hidden_size": shape.hidden_size,
        "attention": trials.attention, "precision": trials.precision, "ranks": args.ranks,
        "fixed_len": args.fixed_len, "steps": steps, "granularity": args.granularity, "tile": args.tile,
        "budget_min": args.budget_min, "memory_budget_gb": budget_gb, "available_gb_at_start": vm.available / 1e9,
        "setups": rows, "skipped": skipped, "wall_s": time.monotonic() - started,
    }
    print(_markdown(result))
    if not args.quick:
        write_result(args.out, f"long_context-{args.device}-{result['date']}", result, _markdown(result))
    return result


def _gb(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) + " GB" if values else "-"


def _markdown(r: dict) -> str:
    on_gpu = r["device"] == "cuda"
    memory_rule = ("no CUDA out-of-memory error" if on_gpu else
                   f"the ranks' resident memory together under {r['memory_budget_gb']:.1f} GB (90% of the "
                   f"{r['available_gb_at_start']:.1f} GB available at the start)")
    lines = [
        f"# Long sequences, {r['date']} ({r['device']})", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"Model: Llama, {r['layers']} layers, width {r['hidden_size']}, {r['params'] / 1e6:.0f}M parameters "
        f"({' '.join(o for o in r['model'] if not o.startswith('model.name'))}); {r['precision']}, "
        f"{r['attention']} attention, ZeRO-2, {r['ranks']} ranks, micro-batch 1. Setups add one lever each to the "
        f"one above. Tiled MLP and loss: pieces of {r['tile']} tokens of a rank's share of the sequence. "
        f"Whole run: {r['wall_s'] / 60:.0f} minutes (budget {r['budget_min']:.0f}).", "",
        f"| setup | overrides (at {r['fixed_len']}) | peak memory per rank at {r['fixed_len']} tokens | "
        f"tokens/s at {r['fixed_len']} | longest seq_len that trained {r['steps']} steps | shortest that did not fit | "
        "runs (seq_len: outcome) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup, row in r["setups"].items():
        fixed, search = row["fixed"], row.get("search")
        ok = fixed["status"] == "ok"
        peaks = _gb(fixed["peak_rss_gb"] if not on_gpu else [fixed.get("device_mem_gb", 0.0)]) if ok else fixed["status"]
        speed = f"{fixed['tokens_per_s']:,.0f}" if ok else "-"
        if search is None:
            longest, failing, runs = "-", "-", f"{fixed['seq_len']}: {fixed['status']}"
        else:
            longest = "-" if search["longest"] is None else f"{search['longest']:,}"
            if search["longest"] is not None and search["first_failing"] is None and search["stopped"] == "time":
                longest = f"≥ {longest} (time budget)"
            elif search["longest"] is not None and search["first_failing"] is None and search["stopped"] == "max_len":
                longest = f"≥ {longest} (longest tried)"
            elif search["stopped"] == "time":
                longest += " (bracket not narrowed further: time budget)"
            elif search["stopped"] == "error":
                longest += " (a run failed for another reason: see the JSON)"
            failing = f"{search['first_failing']:,}" if search["first_failing"] else "-"
            runs = ", ".join(f"{t['seq_len']}: {t['status']}" for t in search["runs"])
        lines.append(f"| {setup} | {' '.join(row['overrides']) or '-'} | {peaks} | {speed} | {longest} | {failing} | "
                     f"{runs} |")
    for setup, why in r["skipped"].items():
        lines.append(f"| {setup} | - | skipped: {why} | - | - | - | - |")
    predictions = [(s, row["search"]["predicted_by_memory"]) for s, row in r["setups"].items()
                   if row.get("search") and row["search"].get("predicted_by_memory")]
    lines += ["", f"Fits: {memory_rule}. Peak memory per rank: "
              + ("the device's peak allocation (rank 0, metrics.jsonl)." if on_gpu else
                 "each rank's own peak resident set (VmHWM).")
              + " Tokens/s: bigtrain's count over steps 2 and later."]
    if predictions:
        lines += ["", "Where a straight line through the two longest passing runs' memory reaches the limit "
                  "(an extrapolation, not a measurement): " + "; ".join(f"{s}: {p:,.0f} tokens" for s, p in predictions) + "."]
    lines += ["", "Timings are noisy: the machine has 2 cores, and other jobs ran on it during the measurement."
              if not on_gpu else ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    # a TERM (a timeout) ends the run in flight too: its ranks are in a session of their own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
