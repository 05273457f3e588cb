"""Checkpoint save and load speed for a model of 100M+ parameters, next to the disk's own
sequential write speed measured in the same run.

    torchrun --nproc_per_node 2 -m benchmarks.checkpoint_io [--model gpt2_small] [--zero 2] [--dir PATH]

Save time covers everything bigtrain does: DeepSpeed's shards on every rank, the per-rank RNG files,
and rank 0's manifest (SHA-256 of every file). Load time covers choosing the checkpoint (checking the
manifest's sizes and checksums) and DeepSpeed's load. Writes benchmarks/results/checkpoint_io-<date>.{json,md}.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain.components.checkpoint.checkpointer import Checkpointer
from bigtrain.components.models import build_model
from bigtrain.config import compose
from bigtrain.config.deepspeed import to_deepspeed_config
from bigtrain.distributed.process_group import init_distributed, select_accelerator
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.runtime.engine import build_engine

RESULTS = Path(__file__).parent / "results"


def disk_write_mb_s(folder: Path, size_mb: int = 1024) -> float:
    """Sequential write of `size_mb` MB in 8 MB blocks, fsync'ed, as `dd conv=fsync` would."""
    path = folder / "disk_speed.tmp"
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size_mb // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return size_mb * (1 << 20) / 1e6 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2_small")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--dir", default="runs/bench-checkpoint-io")
    args = parser.parse_args()

    run_dir = Path(args.dir).absolute()
    cfg = compose([f"model={args.model}", f"zero=stage{args.zero}", f"run_dir={run_dir}",
                   "train.micro_batch_size=1", "train.seq_len=64", "logging.tensorboard=false"])
    select_accelerator("cpu" if not torch.cuda.is_available() else "cuda")
    ranks = init_distributed(1800)
    if ranks.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    dist.barrier()
    model = build_model(cfg.model, cfg.seed)
    params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, to_deepspeed_config(cfg, ranks.world_size), cfg)
    ids = torch.randint(0, 4096, (1, 64), device=engine.device)
    engine.backward(engine(input_ids=ids, labels=ids).loss)  # optimizer states exist after one step
    engine.step()

    checkpointer = Checkpointer(cfg, ranks.rank, ProcessGrid.of(cfg, ranks.world_size))
    checkpointer.attach(engine)
    dist.barrier()
    start = time.perf_counter()
    tag_dir = checkpointer.save(1, samples_seen=ranks.world_size)
    save_s = time.perf_counter() - start
    size_bytes = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())

    dist.barrier()
    start = time.perf_counter()
    checkpointer.load(checkpointer.find_resume_point())
    dist.barrier()
    load_s = time.perf_counter() - start

    if ranks.is_main:
        disk = disk_write_mb_s(run_dir)
        result = {
            "date": date.today().isoformat(),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "model": args.model, "params_m": round(params / 1e6, 1), "zero_stage": args.zero,
            "ranks": ranks.world_size, "checkpoint_mb": round(size_bytes / 1e6, 1),
            "save_s": round(save_s, 2), "save_mb_s": round(size_bytes / 1e6 / save_s, 1),
            "load_s": round(load_s, 2), "load_mb_s": round(size_bytes / 1e6 / load_s, 1),
            "disk_seq_write_mb_s": round(disk, 1),
        }
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"checkpoint_io-{result['date']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(
            f"# Checkpoint save/load, {result['date']}\n\n"
            f"Machine: {result['machine']} ({result['device']}); commit {result['commit']}; "
            f"torch {torch.__version__}.\n\n"
            "| model | params | ZeRO | ranks | checkpoint | save | save MB/s | load | load MB/s | disk write MB/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {args.model} | {result['params_m']}M | {args.zero} | {ranks.world_size} | "
            f"{result['checkpoint_mb']} MB | {result['save_s']} s | {result['save_mb_s']} | "
            f"{result['load_s']} s | {result['load_mb_s']} | {result['disk_seq_write_mb_s']} |\n\n"
            "Save includes the manifest's SHA-256 of every file; load includes verifying it. Saves are "
            "not fsync'ed (the page cache absorbs them, so they can beat the disk); the disk figure "
            "is an fsync'ed sequential write. A file damaged by a power loss after the save fails "
            "its checksum on resume and the previous checkpoint is used.\n"
        )
        print(json.dumps(result, indent=2))
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
