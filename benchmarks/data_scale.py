"""Data at corpus scale: `bigtrain prepare` on a generated corpus of about 1 GB and on the bundled 2 MB
one, then training on each prepared folder.

    python -m benchmarks.data_scale                  # 30 to 50 minutes on a 2-core CPU
    python -m benchmarks.data_scale --quick          # a 2 MB corpus, one training round: checks the code path
    python -m benchmarks.data_scale --corpus-mb 5000 --workers 1 2 4

The generated corpus is JSON lines of documents (80 to 800 words, lines of 12), written to a temporary
folder and deleted at the end. Its words are drawn, seeded, from the bundled corpus's own
whitespace-separated words with their frequencies (about 60,000 distinct forms, punctuation attached),
one in fifty replaced by a random number: text with the bundled corpus's word statistics, so the
tokenizer does the work it does on real text, and the same bytes on every run.

Prepare: `python -m bigtrain.cli prepare --out DIR --workers N` as a command, once per worker count.
Reported: tokens/s (tokens over the prepare's own time, from its meta.json, and over the wall time of
the whole command, start-up included); peak RSS of the process tree (the sum of the resident memory of
the command and its worker processes, sampled 5 times a second) and the largest single process's own
peak (VmHWM); disk bytes per token (every file of the folder over the tokens it holds). The folders
written with different worker counts are compared byte for byte.

Training: `data=prepared data.sources=[DIR]` with the default model (tiny_llama) and ZeRO-2, fp32,
on 2 CPU ranks through the deepspeed launcher (benchmarks/runs.py), a few steps, the two corpora
interleaved over --repeats rounds in alternating order. Reported: time to first step (launch to the
first record in metrics.jsonl; the smallest of the rounds, since machine noise only adds) and each
rank's peak RSS (VmHWM; the largest of the rounds). Bar: the 1 GB corpus within 10% of the 2 MB one
on both.
Results: benchmarks/results/data_scale-cpu-<date>.{json,md}.
"""

import argparse
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil

from benchmarks.runs import launch_and_watch
from benchmarks.throughput import REPO, RESULTS, _commit, _versions, env, write_result

CORPUS = REPO / "bigtrain" / "assets" / "corpus"
BAR = 1.10  # the large corpus's time to first step and rank memory, at most this times the small one's
WORDS_PER_LINE = 12
NUMBER_SHARE = 0.02


def bundled_words() -> tuple[list[str], np.ndarray]:
    """The bundled corpus's whitespace-separated words and their frequencies, most frequent first."""
    counts: dict[str, int] = {}
    for path in sorted(CORPUS.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                for word in json.loads(line)["text"].split():
                    counts[word] = counts.get(word, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [w for w, _ in ordered], np.array([c for _, c in ordered], dtype=np.float64)


def generate_corpus(path: Path, target_bytes: int, seed: int = 0) -> dict:
    """Write JSON-lines documents until the file holds at least `target_bytes`; the same bytes for the
    same arguments."""
    words, counts = bundled_words()
    vocabulary = np.array(words, dtype=object)
    cdf = np.cumsum(counts / counts.sum())
    rng = np.random.default_rng(seed)
    written = documents = total_words = 0
    started = time.perf_counter()
    with open(path, "w", encoding="utf-8") as out:
        while written < target_bytes:
            lengths = rng.integers(80, 801, size=256)
            draws = np.searchsorted(cdf, rng.random(int(lengths.sum())), side="right").clip(max=len(words) - 1)
            chosen = vocabulary[draws]
            numbers = np.flatnonzero(rng.random(len(draws)) < NUMBER_SHARE)
            chosen[numbers] = [str(n) for n in rng.integers(0, 100_000, size=len(numbers)).tolist()]
            chosen = chosen.tolist()
            lines = []
            begin = 0
            for length in lengths.tolist():
                doc = chosen[begin:begin + length]
                begin += length
                text = "\n".join(" ".join(doc[i:i + WORDS_PER_LINE]) for i in range(0, length, WORDS_PER_LINE))
                lines.append(json.dumps({"text": text}, ensure_ascii=False))
            block = "\n".join(lines) + "\n"
            out.write(block)
            written += len(block.encode("utf-8"))
            documents += len(lengths)
            total_words += int(lengths.sum())
    return {"path": str(path), "bytes": path.stat().st_size, "documents": documents, "words": total_words,
            "distinct_words": len(words), "seconds": time.perf_counter() - started}


def tree_watch(proc: subprocess.Popen, interval_s: float = 0.5, relist_every: int = 4) -> dict:
    """Wait for `proc`, sampling the resident memory of it and all its descendants (listed again every
    `relist_every` samples: listing walks every process of the machine, which costs a core's time)."""
    root = psutil.Process(proc.pid)
    peak_tree, peak_own, processes, samples = 0.0, {}, [root], 0
    while proc.poll() is None:
        if samples % relist_every == 0:
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        samples += 1
        held = 0.0
        for process in processes:
            try:
                held += process.memory_info().rss / 1e9
                with open(f"/proc/{process.pid}/status") as status:
                    hwm = next((int(line.split()[1]) * 1024 / 1e9 for line in status if line.startswith("VmHWM:")), 0.0)
                peak_own[process.pid] = max(peak_own.get(process.pid, 0.0), hwm)
            except (psutil.Error, OSError):  # it ended between listing and reading
                pass
        peak_tree = max(peak_tree, held)
        time.sleep(interval_s)
    return {"peak_tree_rss_gb": peak_tree, "peak_process_rss_gb": max(peak_own.values(), default=0.0),
            "processes": len(peak_own)}


def prepare(data: list[str], out: Path, workers: int) -> dict:
    """One `bigtrain prepare` command, watched."""
    command = [sys.executable, "-m", "bigtrain.cli", "prepare", "--out", str(out), "--workers", str(workers),
               "--no-progress", *data]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        memory = tree_watch(proc)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"bigtrain prepare failed (exit {proc.returncode}):\n{output[-3000:]}")
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    documents = sum(split["documents"] for split in meta["splits"].values())
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    row = {"workers": workers, "tokens": tokens, "documents": documents, "prepare_s": meta["seconds"],
           "wall_s": wall, "tokens_per_s": tokens / meta["seconds"], "tokens_per_s_wall": tokens / wall,
           "disk_bytes": disk, "bytes_per_token": disk / tokens, "dtype": meta["dtype"], **memory}
    print(f"  prepare, {workers} worker(s): {tokens:,} tokens in {meta['seconds']:.1f} s "
          f"({row['tokens_per_s']:,.0f} tokens/s; {wall:.1f} s wall), tree peak {memory['peak_tree_rss_gb']:.2f} GB, "
          f"{row['bytes_per_token']:.3f} bytes/token", flush=True)
    return row


def _gunzipped_size(path: Path) -> int:
    with gzip.open(path) as f:
        return len(f.read())


def same_files(a: Path, b: Path) -> bool:
    """Whether two prepared folders hold the same token files (meta.json differs in its timing)."""
    names = sorted(f.name for f in a.iterdir() if f.suffix in (".bin", ".idx"))
    if names != sorted(f.name for f in b.iterdir() if f.suffix in (".bin", ".idx")):
        return False
    return all(subprocess.run(["cmp", "-s", str(a / n), str(b / n)], check=False).returncode == 0 for n in names)


def train(folder: Path, steps: int, workdir: Path, name: str) -> dict:
    run_dir = workdir / f"train-{name}-{time.monotonic_ns()}"
    overrides = ["data=prepared", f"data.sources=[{folder}]", "precision=fp32", f"train.max_steps={steps}",
                 "logging.interval=1", "logging.tensorboard=false", "checkpoint.save_final=false",
                 "checkpoint.resume=never"]
    run = launch_and_watch(overrides, 2, run_dir, workdir / f"{run_dir.name}.log", interval_s=0.2)
    if not run["ok"]:
        raise RuntimeError(f"training on {folder} failed (exit {run['exit_code']}):\n{run['log_tail']}")
    row = {"time_to_first_step_s": run["time_to_first_step_s"], "peak_rss_gb": run["peak_rss_gb"],
           "first_step_time_s": run["records"][0]["step_time_s"], "wall_s": run["wall_s"],
           "final_loss": run["records"][-1]["loss"], "rank0_mem_gb": run["records"][-1]["mem_gb"]}
    print(f"  train on {name}: first step after {row['time_to_first_step_s']:.1f} s, peak RSS per rank "
          f"{', '.join(f'{g:.3f}' for g in row['peak_rss_gb'])} GB", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=1000.0, help="size of the generated corpus (MB)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare's worker counts")
    parser.add_argument("--steps", type=int, default=5, help="training steps on each prepared folder")
    parser.add_argument("--repeats", type=int, default=2, help="training rounds, the corpora interleaved")
    parser.add_argument("--seed", type=int, default=0, help="seeds the generated corpus")
    parser.add_argument("--workdir", type=Path, help="where the corpus and prepared folders go (default: a new "
                        "temporary folder, deleted at the end)")
    parser.add_argument("--quick", action="store_true",
                        help="a 2 MB corpus, one worker count, 2 steps, one round: checks the code path")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.corpus_mb, args.workers, args.steps, args.repeats = 2.0, [1], 2, 1

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bigtrain-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        corpus_path = workdir / "generated.jsonl"
        made_with = {"target_bytes": int(args.corpus_mb * 1e6), "seed": args.seed}
        record = workdir / "generated.meta.json"
        if corpus_path.is_file() and record.is_file() and json.loads(record.read_text())["made_with"] == made_with:
            generated = json.loads(record.read_text())["generated"]  # a --workdir of an earlier run: the same bytes
            print(f"reusing {corpus_path}", flush=True)
        else:
            print(f"generating {args.corpus_mb:,.0f} MB of text in {corpus_path}", flush=True)
            generated = generate_corpus(corpus_path, made_with["target_bytes"], args.seed)
            record.write_text(json.dumps({"made_with": made_with, "generated": generated}))
        print(f"  {generated['bytes'] / 1e6:,.0f} MB, {generated['documents']:,} documents, "
              f"{generated['words']:,} words in {generated['seconds']:.0f} s", flush=True)
        corpora = {
            "bundled": {"data": ["data=bundled"],
                        "bytes": sum(_gunzipped_size(p) for p in CORPUS.glob("*.jsonl.gz"))},
            "generated": {"data": ["data=hf", "data.name=generated", "data.builder=json",
                                   f"data.files=[{corpus_path}]"], "bytes": generated["bytes"]},
        }
        rows: dict[str, dict] = {}
        for name, corpus in corpora.items():
            print(f"{name} ({corpus['bytes'] / 1e6:,.1f} MB of text):", flush=True)
            for w in args.workers:  # a --workdir of an earlier run: prepare again, not "up to date"
                shutil.rmtree(workdir / f"{name}-w{w}", ignore_errors=True)
            runs = [prepare(corpus["data"], workdir / f"{name}-w{w}", w) for w in args.workers]
            identical = all(same_files(workdir / f"{name}-w{args.workers[0]}", workdir / f"{name}-w{w}")
                            for w in args.workers[1:])
            rows[name] = {"text_bytes": corpus["bytes"], "prepare": runs, "identical_across_workers": identical,
                          "train": []}
            for w in args.workers[1:]:  # one prepared folder per corpus stays for training
                shutil.rmtree(workdir / f"{name}-w{w}", ignore_errors=True)
        for round_number in range(args.repeats):
            # the order alternates (bundled, generated, generated, bundled, ...): what a launch right after
            # another one gains or loses falls on both corpora alike
            for name in list(corpora)[:: -1 if round_number % 2 else 1]:
                rows[name]["train"].append(train(workdir / f"{name}-w{args.workers[0]}", args.steps, workdir, name))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    for row in rows.values():
        rounds = row["train"]
        row["time_to_first_step_s"] = min(r["time_to_first_step_s"] for r in rounds)
        row["peak_rss_per_rank_gb"] = max(max(r["peak_rss_gb"]) for r in rounds)
    small, large = rows["bundled"], rows["generated"]
    ratios = {"time_to_first_step": large["time_to_first_step_s"] / small["time_to_first_step_s"],
              "peak_rss_per_rank": large["peak_rss_per_rank_gb"] / small["peak_rss_per_rank_gb"]}
    targets = [{"target": f"{what}: generated corpus within 10% of the bundled one",
                "measured": f"{ratios[key]:.3f}x", "met": ratios[key] <= BAR}
               for key, what in (("time_to_first_step", "time to first step"),
                                 ("peak_rss_per_rank", "peak RSS per rank"))]
    result = {
        "date": date.today().isoformat(), "device": "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 1e9:.1f} GB RAM",
        "versions": _versions(), "commit": _commit(), "quick": args.quick, "seed": args.seed,
        "workers": args.workers, "steps": args.steps, "repeats": args.repeats, "generated": generated,
        "corpora": rows, "ratios": ratios, "targets": targets, "wall_s": time.perf_counter() - started,
    }
    print(_markdown(result))
    if not args.quick:
        write_result(args.out, f"data_scale-cpu-{result['date']}", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    g = r["generated"]
    lines = [
        f"# Data at corpus scale, {r['date']} ({r['device']})", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"Generated corpus: {g['bytes'] / 1e6:,.0f} MB of JSON lines, {g['documents']:,} documents, {g['words']:,} "
        f"words drawn (seed {r['seed']}) from the bundled corpus's {g['distinct_words']:,} word forms by frequency, "
        f"2% random numbers. Bundled tokenizer (4,096 ids). Whole run: {r['wall_s'] / 60:.0f} minutes.", "",
        "## Prepare", "",
        "| corpus | text | workers | documents | tokens | tokens/s (prepare) | tokens/s (wall, start-up included) | "
        "peak RSS, process tree | peak RSS, largest process | disk bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["corpora"].items():
        for p in row["prepare"]:
            lines.append(f"| {name} | {row['text_bytes'] / 1e6:,.1f} MB | {p['workers']} | {p['documents']:,} | "
                         f"{p['tokens']:,} | {p['tokens_per_s']:,.0f} | {p['tokens_per_s_wall']:,.0f} | "
                         f"{p['peak_tree_rss_gb']:.2f} GB | {p['peak_process_rss_gb']:.2f} GB | "
                         f"{p['bytes_per_token']:.3f} |")
    same = all(row["identical_across_workers"] for row in r["corpora"].values())
    lines += ["", f"Token files identical whatever the worker count: {'yes' if same else '**no**'}.", "",
              f"## Training on the prepared folders ({r['steps']} steps, 2 CPU ranks, tiny_llama, ZeRO-2, fp32; "
              f"{r['repeats']} round(s), interleaved)", "",
              "| corpus | time to first step (each round) | peak RSS per rank (each round) | "
              "time to first step (best) | peak RSS per rank (largest) |", "|---|---|---|---|---|"]
    for name, row in r["corpora"].items():
        times = ", ".join(f"{t['time_to_first_step_s']:.1f} s" for t in row["train"])
        memory = "; ".join(" / ".join(f"{g:.3f}" for g in t["peak_rss_gb"]) + " GB" for t in row["train"])
        lines.append(f"| {name} | {times} | {memory} | {row['time_to_first_step_s']:.1f} s | "
                     f"{row['peak_rss_per_rank_gb']:.3f} GB |")
    lines += ["", "| target | measured (generated / bundled) | |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |" for t in r["targets"]]
    lines += ["", "Timings are noisy: the machine has 2 cores, and other jobs ran on it during the measurement. "
              "Peak RSS per rank is each rank's own VmHWM; the process-tree peak of prepare sums the resident "
              "memory of the command and its workers (shared library pages counted once per process)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # a TERM (a timeout) ends the run in flight too: its ranks are in a session of their own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
