"""Pipeline and tensor parallelism next to data parallelism: tokens/s and peak memory per rank.

    python -m benchmarks.model_parallel              # about 10 minutes on a 2-core CPU
    python -m benchmarks.model_parallel --steps 20 --ranks 4

The same model (a Llama of 119M parameters: width 768, 16 layers, the bundled 4096-token vocabulary),
the same global batch and the same ZeRO stage (1, the highest pipeline parallelism allows) are
trained three ways on `--ranks` ranks: all data-parallel, pipeline=2 (x data), tensor=2 (x data).
The pipeline runs its share of the batch as 4 micro-batches per step, so that both stages have work
at once; data and tensor parallelism run theirs as 2 micro-batches of twice that size.

Reported per layout: steady-state tokens/s and step time (after the first 2 steps), and the peak
resident memory of every rank (what each rank holds: a data-parallel rank the whole model plus its
ZeRO-1 share of the optimizer, a pipeline rank its stage, a tensor rank its shards).
Results: benchmarks/results/model_parallel-<device>-<date>.{json,md}.
"""

import argparse
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import psutil

from benchmarks.runs import launch_and_watch
from benchmarks.throughput import RESULTS, _commit, _versions, write_result

MODEL = ["model=tiny_llama", "model.name=llama_119m", "model.hf_config.hidden_size=768",
         "model.hf_config.intermediate_size=2048", "model.hf_config.num_hidden_layers=16",
         "model.hf_config.num_attention_heads=12", "model.hf_config.num_key_value_heads=12"]
SEQ_LEN = 128


def layouts(ranks: int, global_batch: int) -> dict[str, list[str]]:
    """Overrides for each layout, all with `global_batch` sequences per step."""
    data_only = global_batch // (2 * ranks)
    model_parallel = global_batch // (ranks // 2)
    return {
        f"data={ranks}": [f"train.micro_batch_size={data_only}", "train.grad_accum=2"],
        f"pipeline=2 x data={ranks // 2}": ["parallel.pipeline=2", f"train.micro_batch_size={model_parallel // 4}",
                                              "train.grad_accum=4"],
        f"tensor=2 x data={ranks // 2}": ["parallel.tensor=2", f"train.micro_batch_size={model_parallel // 2}",
                                            "train.grad_accum=2"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=16, help="sequences of 128 tokens per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-mp-"))
    rows = {}
    for name, layout in layouts(args.ranks, args.global_batch).items():
        overrides = [*MODEL, *layout, "zero=stage1", "precision=fp32", f"train.seq_len={SEQ_LEN}",
                     f"train.max_steps={args.steps}", "logging.interval=1", "logging.tensorboard=false",
                     "checkpoint.save_final=false", "checkpoint.resume=never"]
        run_dir = workdir / name.replace(" ", "").replace("=", "")
        run = launch_and_watch(overrides, args.ranks, run_dir, workdir / f"{run_dir.name}.log")
        if not run["ok"]:
            raise RuntimeError(f"{name} failed:\n{run['log_tail']}")
        steady = [r for r in run["records"] if r["step"] > 2]
        step_time = sum(r["step_time_s"] for r in steady) / len(steady)
        rows[name] = {"overrides": layout, "tokens_per_s": args.global_batch * SEQ_LEN / step_time,
                      "step_time_s": step_time, "peak_rss_per_rank_gb": run["peak_rss_gb"],
                      "final_loss": run["records"][-1]["loss"]}
        print(f"{name}: {rows[name]['tokens_per_s']:,.0f} tok/s, peak RSS per rank "
              f"{', '.join(f'{g:.2f}' for g in run['peak_rss_gb'])} GB", flush=True)

    from bigtrain.components.models import model_shape
    from bigtrain.config import compose

    params = model_shape(compose([*MODEL, "run_dir=/tmp/unused"]).model).parameters
    result = {"date": date.today().isoformat(), "device": "cpu",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 1e9:.1f} GB RAM",
              "versions": _versions(), "commit": _commit(), "params": params, "ranks": args.ranks,
              "global_batch": args.global_batch, "seq_len": SEQ_LEN, "steps": args.steps, "layouts": rows}
    print(_markdown(result))
    write_result(args.out, f"model_parallel-{result['device']}-{result['date']}", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        f"# Pipeline and tensor parallelism vs data parallelism, {r['date']} ({r['device']})", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"Llama of {r['params'] / 1e6:.0f}M parameters, {r['ranks']} ranks, ZeRO-1, fp32, global batch "
        f"{r['global_batch']} x {r['seq_len']} tokens, {r['steps']} steps (the first 2 not timed).", "",
        "| layout | tokens/s | step time | peak RSS per rank | final loss |", "|---|---|---|---|---|",
    ]
    for name, row in r["layouts"].items():
        memory = " / ".join(f"{g:.2f} GB" for g in row["peak_rss_per_rank_gb"])
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {row['step_time_s']:.2f} s | {memory} | "
                     f"{row['final_loss']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
