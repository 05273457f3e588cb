"""The baseline bigtrain is measured against: a minimal hand-written loop over deepspeed.initialize.

    deepspeed --num_gpus N benchmarks/raw_deepspeed.py --ds-config ds_config.json --model-config cfg.json \
        --seq-len T --steps S --warmup W --out result.json

Same model (built from the same transformers config), same DeepSpeed JSON, random tokens (no data
pipeline), no bigtrain code at all. Rank 0 writes steady-state tokens/s, step time and memory.
"""

import argparse
import json
import os
import time

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoConfig, AutoModelForCausalLM

from bigtrain.monitor.metrics import peak_rss_gb


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--model-config", required=True, help="JSON: {'family': ..., 'hf_config': {...}}")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    ds_config = json.load(open(args.ds_config))
    ds_config.pop("tensorboard", None)
    spec = json.load(open(args.model_config))
    deepspeed.init_distributed()
    rss_before = rss_gb()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec["family"], **spec["hf_config"]))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    vocab = model.config.vocab_size
    step_times = []
    for step in range(args.warmup + args.steps):
        get_accelerator().synchronize()
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, args.seq_len), device=engine.device)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        get_accelerator().synchronize()
        step_times.append(time.perf_counter() - start)
        if step == 0:
            model_state_gb = rss_gb() - rss_before
    steady = step_times[args.warmup:]
    step_time = sum(steady) / len(steady)
    if torch.distributed.get_rank() == 0:
        on_gpu = get_accelerator().device_name() != "cpu"
        json.dump({
            "tokens_per_s": ds_config["train_batch_size"] * args.seq_len / step_time,
            "step_time_s": step_time,
            "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9 if on_gpu
                            else peak_rss_gb()),
            "model_state_gb": model_state_gb if not on_gpu else torch.cuda.memory_allocated() / 1e9,
        }, open(args.out, "w"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
