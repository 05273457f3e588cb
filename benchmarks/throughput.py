"""How fast bigtrain trains, next to raw DeepSpeed and plain PyTorch measured in the same run.

    python -m benchmarks.throughput                 # default set: about 10 minutes on a 2-core CPU
    python -m benchmarks.throughput --quick         # seconds; what the test suite runs
    python -m benchmarks.throughput                 # on a CUDA machine: llama_1b, bf16, every GPU

On a GPU the defaults become model=llama_1b (1.2B), bf16 with PyTorch's SDPA attention (the flash
kernel on H100), micro-batch 8 x 2048 tokens per GPU.

Three ways, interleaved over --repeats rounds so that machine noise hits them alike:
  (a) bigtrain: `deepspeed --module bigtrain.train` with the model, batch and ZeRO stage below;
  (b) raw DeepSpeed: benchmarks/raw_deepspeed.py, a minimal loop over deepspeed.initialize with the
      DeepSpeed JSON bigtrain derived (same launcher, its defaults);
  (c) plain PyTorch: one process, all cores, the same model, global batch and AdamW.
Then a sweep of ZeRO stage x offload through (b) for per-rank memory next to the ZeRO paper's
model-state formula, and through (a) for tokens/s.

FLOPs: 6 N + 12 L d T per token (PaLM appendix B / Megatron MFU), N = matmul parameters. MFU is
against a peak measured here, now: a large fp32 matmul on the CPU, bf16 on a GPU.
Results: benchmarks/results/throughput-<date>.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bigtrain.api.training import deepspeed_devices
from bigtrain.monitor.timing import PHASES

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent
# A Llama of width 512 (CPU target: >= 60% of the matmul peak needs hidden size >= 512).
MODEL = ["model=tiny_llama", "model.name=llama_d512", "model.hf_config.hidden_size=512",
         "model.hf_config.intermediate_size=1376", "model.hf_config.num_attention_heads=8",
         "model.hf_config.num_key_value_heads=8"]
SWEEP = [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
         (3, "none"), (3, "optimizer"), (3, "full")]


def measure_peak_tflops(device: str) -> float:
    """Best of a few large matmuls: fp32 on the CPU, bf16 on a GPU."""
    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn_like(a)
        n, reps = 8192, 20
    else:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        n, reps = 2048, 10
    best = float("inf")
    for _ in range(3):
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e12


def env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore")


def run_bigtrain(overrides: list[str], ranks: int, workdir: Path, warmup: int) -> dict:
    run_dir = workdir / f"bigtrain-{time.monotonic_ns()}"
    command = [str(BIN / "deepspeed"), *deepspeed_devices(ranks, torch.cuda.is_available()), "--module", "bigtrain.train",
               *overrides, f"run_dir={run_dir}", "checkpoint.resume=never"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics_path, first_step_s = run_dir / "metrics.jsonl", None
    while proc.poll() is None:
        if first_step_s is None and metrics_path.exists() and metrics_path.stat().st_size:
            first_step_s = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"bigtrain run failed:\n{proc.stderr.read()[-3000:]}")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steady = [r for r in records if r["step"] > warmup and r["step"] % 10 == 0] or records[-1:]
    step_time = sum(r["step_time_s"] for r in steady) / len(steady)
    tokens_per_step = steady[0]["tokens_per_s"] * steady[0]["step_time_s"]
    return {
        "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
        "tflops": sum(r["tflops"] for r in steady) / len(steady), "peak_mem_gb": records[-1]["mem_gb"],
        "time_to_first_step_s": first_step_s, "run_dir": str(run_dir), "phases": step_phases(steady),
    }


def step_phases(records: list[dict]) -> dict[str, float]:
    """Rank 0's mean seconds per step in each phase bigtrain's monitor times (metrics.jsonl)."""
    return {phase: sum(r[f"{phase}_s"] for r in records) / len(records)
            for phase in PHASES}


def run_raw(run_dir: str, ranks: int, seq_len: int, steps: int, warmup: int, workdir: Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    spec = workdir / "model.json"
    spec.write_text(json.dumps({"family": cfg.model.family,
                                "hf_config": OmegaConf.to_container(cfg.model.hf_config)}))
    out = workdir / f"raw-{time.monotonic_ns()}.json"
    subprocess.run([str(BIN / "deepspeed"), *deepspeed_devices(ranks, torch.cuda.is_available()),
                    str(REPO / "benchmarks" / "raw_deepspeed.py"),
                    "--ds-config", str(Path(run_dir) / "ds_config.json"), "--model-config", str(spec),
                    "--seq-len", str(seq_len), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)],
                   cwd=workdir, env=env(), check=True, capture_output=True)
    return json.loads(out.read_text())


def run_plain(run_dir: str, batch: int, seq_len: int, steps: int, warmup: int, device: str) -> dict:
    """One process, torch AdamW, in a child so its memory is its own: on the CPU every core and the
    global batch; on a GPU one GPU with one rank's micro-batch, in bf16 autocast (fp32 weights and
    optimizer, as DeepSpeed's bf16 keeps its master copy), with torch's fused AdamW."""
    code = f"""
import json, time, torch
from omegaconf import OmegaConf
from bigtrain.monitor.metrics import peak_rss_gb
from transformers import AutoConfig, AutoModelForCausalLM
cfg = OmegaConf.load({str(Path(run_dir) / 'config.yaml')!r})
device = {device!r}
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.model.family, **cfg.model.hf_config),
                                         attn_implementation=cfg.model.attn_implementation).to(device)
opt = cfg.optimizer
optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                              weight_decay=opt.weight_decay, fused=True)
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
times = []
for step in range({warmup + steps}):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = torch.randint(0, model.config.vocab_size, ({batch}, {seq_len}), device=device)
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
step_time = sum(times[{warmup}:]) / {steps}
memory = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else peak_rss_gb()
print(json.dumps({{"tokens_per_s": {batch * seq_len} / step_time, "step_time_s": step_time, "peak_mem_gb": memory}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env(), check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fitting_micro_batch(overrides: list[str], ranks: int, device_memory_gb: float, start: int = 8) -> int:
    """The largest micro-batch (halving from `start`) that bigtrain's planner says fits one GPU at the
    chosen ZeRO stage, so the GPU mode's default shape never runs out of memory."""
    from dataclasses import replace

    from bigtrain.tools.plan import USABLE, Hardware, plan, process_baseline_gb

    hardware = Hardware(nodes=1, ranks_per_node=ranks, device="cuda", device_memory_gb=device_memory_gb,
                        cpu_memory_gb=1e6, nvme_gb=None)
    stage = next(int(o.split("stage")[1]) for o in overrides if o.startswith("zero="))
    micro = start
    while micro > 1:
        _, _, options = plan([*overrides, f"train.micro_batch_size={micro}", "run_dir=/tmp/unused"],
                             replace(hardware), process_baseline_gb(1.0))
        option = next(o for o in options if o.stage == stage and o.offload == "none")
        if option.estimate is not None and option.estimate.device_gb <= USABLE * device_memory_gb:
            break
        micro //= 2
    return micro


def profile_plain(run_dir: str, global_batch: int, seq_len: int) -> dict:
    """Where the time of one plain-PyTorch step goes: torch.profiler's top operators by self CPU time."""
    code = f"""
import json, torch
from torch.profiler import profile, ProfilerActivity
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM
cfg = OmegaConf.load({str(Path(run_dir) / 'config.yaml')!r})
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.model.family, **cfg.model.hf_config))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
def step():
    ids = torch.randint(0, model.config.vocab_size, ({global_batch}, {seq_len}))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        step()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
print(json.dumps({{"matmul_share": matmul / total,
                  "top_ops": [{{"op": e.key, "share": e.self_cpu_time_total / total}} for e in top]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env(), check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zero_model_state_gb(params: int, stage: int, dp: int) -> float:
    """The ZeRO paper's (2 + 2 + K) x params / divisions, for fp32 training with Adam: 4 bytes of
    weights, 4 of gradients and K of optimizer state per parameter. ZeRO-0 steps the weights in place
    (K = 8: the two moments); ZeRO-1/2/3 step a flat fp32 master copy of their partition, even when the
    weights are fp32 (K = 12: copy and moments, as in the paper). Stage 1 divides the optimizer state
    by the data-parallel ranks, stage 2 also the gradients, stage 3 the weights too."""
    weights, grads, optim = 4 * params, 4 * params, (8 if stage == 0 else 12) * params
    if stage >= 1:
        optim /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        weights /= dp
    return (weights + grads + optim) / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--model", nargs="+", help="model overrides (default: a width-512 Llama on the CPU, "
                        "model=llama_1b on a GPU)")
    parser.add_argument("--micro-batch", type=int, help="default: 4 on the CPU, 8 on a GPU")
    parser.add_argument("--seq-len", type=int, help="default: 128 on the CPU, 2048 on a GPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of 10)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, few steps, no sweep: checks the code path in about a minute")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    model = args.model or (["model=llama_1b"] if on_gpu else MODEL)
    args.seq_len = args.seq_len or (2048 if on_gpu else 128)
    precision = "precision=bf16" if on_gpu else "precision=fp32"
    if args.quick:
        model = args.model or ["model=tiny_llama"]
        args.micro_batch, args.seq_len, args.steps, args.warmup, args.repeats = 2, 32, 10, 0, 1
    base = [*model, precision, f"zero=stage{args.zero}", f"train.seq_len={args.seq_len}",
            f"train.max_steps={args.warmup + args.steps}", "logging.interval=10", "logging.tensorboard=false",
            f"train.device={device}", "checkpoint.save_final=false"]
    if not args.micro_batch:
        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if on_gpu else 0
        args.micro_batch = fitting_micro_batch(base, args.ranks, gpu_gb) if on_gpu else 4
    overrides = [*base, f"train.micro_batch_size={args.micro_batch}"]
    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    if on_gpu:  # MFU against the datasheet's dense bf16 peak, as GPU MFU is usually quoted
        from bigtrain.monitor.peak import resolve_peak_tflops

        peak, source = resolve_peak_tflops(None, "cuda", "bf16")
    else:
        peak, source = measure_peak_tflops(device), "measured fp32 matmul, all cores"
    print(f"peak: {peak:.3f} TFLOP/s per device ({source})")

    rounds = []
    for _ in range(args.repeats):
        a = run_bigtrain(overrides, args.ranks, workdir, args.warmup)
        b = run_raw(a["run_dir"], args.ranks, args.seq_len, args.steps, args.warmup, workdir)
        plain_batch = args.micro_batch if on_gpu else args.micro_batch * args.ranks
        c = run_plain(a["run_dir"], plain_batch, args.seq_len, args.steps, args.warmup, device)
        rounds.append({"bigtrain": a, "raw_deepspeed": b, "plain_pytorch": c})
        print(f"bigtrain {a['tokens_per_s']:,.0f} tok/s | raw DeepSpeed {b['tokens_per_s']:,.0f} | "
              f"plain PyTorch {c['tokens_per_s']:,.0f}")

    def mean(way: str, key: str) -> float:
        return sum(r[way][key] for r in rounds) / len(rounds)

    from bigtrain.components.models import model_shape
    from bigtrain.config import compose
    from bigtrain.monitor.metrics import flops_per_token

    cfg = compose([*overrides, "run_dir=/tmp/unused"])
    shape = model_shape(cfg.model)
    params = shape.parameters
    fpt = flops_per_token(shape.matmul_parameters, shape.num_layers, shape.hidden_size, args.seq_len)
    comparison = {}
    for way in ("bigtrain", "raw_deepspeed", "plain_pytorch"):
        tps = mean(way, "tokens_per_s")
        # Devices the way's tokens/s came from: on GPUs the plain loop runs on one, the others on every rank;
        # on the CPU every way uses all the cores, which `peak` measured.
        devices = (1 if way == "plain_pytorch" else args.ranks) if on_gpu else 1
        comparison[way] = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / devices,
                           "step_time_s": mean(way, "step_time_s"), "tflops": tps * fpt / 1e12,
                           "mfu": tps * fpt / 1e12 / (peak * devices), "peak_mem_gb": mean(way, "peak_mem_gb")}
    comparison["bigtrain"]["time_to_first_step_s"] = mean("bigtrain", "time_to_first_step_s")
    comparison["bigtrain"]["phases"] = {phase: sum(r["bigtrain"]["phases"][phase] for r in rounds) / len(rounds)
                                        for phase in rounds[0]["bigtrain"]["phases"]}
    per_device = "tokens_per_s_per_device"
    ratios = {"bigtrain / raw DeepSpeed": comparison["bigtrain"][per_device] / comparison["raw_deepspeed"][per_device],
              "bigtrain / plain PyTorch": comparison["bigtrain"][per_device] / comparison["plain_pytorch"][per_device]}

    profile = profile_plain(a["run_dir"], args.micro_batch * args.ranks, args.seq_len) if not on_gpu else None
    targets = [
        {"target": "bigtrain / raw DeepSpeed tokens/s >= 0.97", "measured": f"{ratios['bigtrain / raw DeepSpeed']:.2f}",
         "met": ratios["bigtrain / raw DeepSpeed"] >= 0.97},
        {"target": f"achieved FLOP/s >= {'50% MFU' if device == 'cuda' else '60% of the measured matmul peak'}",
         "measured": f"{comparison['bigtrain']['mfu']:.1%}",
         "met": comparison["bigtrain"]["mfu"] >= (0.5 if device == "cuda" else 0.6)},
    ]
    if device == "cpu":
        targets.append({"target": f"{args.ranks} CPU ranks >= 90% of one plain PyTorch process",
                        "measured": f"{ratios['bigtrain / plain PyTorch']:.0%}",
                        "met": ratios["bigtrain / plain PyTorch"] >= 0.9})

    sweep = []
    if not args.no_sweep and not args.quick:
        for stage, offload in SWEEP:
            sweep_overrides = [o for o in overrides if not o.startswith("zero=")]
            a = run_bigtrain([*sweep_overrides, f"zero=stage{stage}", f"offload={offload}"], args.ranks, workdir,
                             args.warmup)
            b = run_raw(a["run_dir"], args.ranks, args.seq_len, max(2, args.steps // 4), 1, workdir)
            sweep.append({"zero": stage, "offload": offload, "tokens_per_s": a["tokens_per_s"],
                          "peak_mem_gb": a["peak_mem_gb"], "model_state_gb": b["model_state_gb"],
                          "zero_formula_gb": zero_model_state_gb(params, stage, args.ranks)})
            print(f"ZeRO-{stage} offload={offload}: {a['tokens_per_s']:,.0f} tok/s, model states "
                  f"{b['model_state_gb']:.3f} GB (formula {sweep[-1]['zero_formula_gb']:.3f})")

    result = {
        "date": date.today().isoformat(), "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
            f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
        "versions": _versions(), "commit": _commit(), "model": cfg.model.name, "params": params,
        "ranks": args.ranks, "zero": args.zero, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "global_batch": args.micro_batch * args.ranks, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "peak_tflops": peak, "peak_source": source, "flops_per_token": fpt,
        "comparison": comparison, "ratios": ratios, "targets": targets, "profile": profile, "sweep": sweep,
    }
    print(_markdown(result))
    if not args.quick:
        write_result(args.out, f"throughput-{device}-{result['date']}", result, _markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        f"# Throughput, {r['date']} ({r['device']})", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"Model {r['model']} ({r['params'] / 1e6:.1f}M parameters), {r['ranks']} ranks, ZeRO-{r['zero']}, "
        f"global batch {r['global_batch']} x {r['seq_len']} tokens, {r['warmup']} warm-up + {r['steps']} timed "
        f"steps, {r['repeats']} interleaved rounds. Peak {r['peak_tflops']:.3f} TFLOP/s per device "
        f"({r.get('peak_source', 'measured')}). "
        f"FLOPs/token = 6N + 12LdT = {r['flops_per_token'] / 1e6:.1f}M.", "",
        "| | tokens/s | step time | TFLOP/s | MFU | peak memory / rank | time to first step |",
        "|---|---|---|---|---|---|---|",
    ]
    for way, row in r["comparison"].items():
        first = f"{row['time_to_first_step_s']:.1f} s" if row.get("time_to_first_step_s") else ""
        lines.append(f"| {way} | {row['tokens_per_s']:,.0f} | {row['step_time_s'] * 1000:.0f} ms | "
                     f"{row['tflops']:.3f} | {row['mfu']:.1%} | {row['peak_mem_gb']:.2f} GB | {first} |")
    lines += [""] + [f"- {name}: **{value:.2f}**" for name, value in r["ratios"].items()]
    lines += ["", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |" for t in r["targets"]]
    phases = r["comparison"]["bigtrain"].get("phases")
    if phases:
        lines += ["", "Where a bigtrain step's time goes (rank 0, bigtrain's step-time split): " + ", ".join(
            f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in phases.items()) + " (backward holds "
            "ZeRO's gradient reduction, optimizer the step and, at ZeRO-1/2, the parameter all-gather)."]
    prof = r["profile"] or {"matmul_share": float("nan"), "top_ops": []}
    lines += [] if not r["profile"] else ["", f"Where a plain-PyTorch step's time goes (torch.profiler, self CPU time): matrix multiplies "
                  f"(mm, addmm, bmm) {prof['matmul_share']:.0%}; top operators: " + ", ".join(
                      f"{o['op']} {o['share']:.0%}" for o in prof["top_ops"][:8]) + "."]
    if r["sweep"]:
        lines += ["", "| ZeRO | offload | bigtrain tokens/s | peak memory / rank | model states / rank "
                      "(measured) | ZeRO formula |", "|---|---|---|---|---|---|"]
        for s in r["sweep"]:
            lines.append(f"| {s['zero']} | {s['offload']} | {s['tokens_per_s']:,.0f} | {s['peak_mem_gb']:.2f} GB | "
                         f"{s['model_state_gb']:.3f} GB | {s['zero_formula_gb']:.3f} GB |")
        lines += ["", "Model states (measured): the rank's resident memory after its first step minus before the "
                      "model was built, in the raw DeepSpeed loop. It holds what the formula counts (fp32: 4 B "
                      "weights + 4 B gradients + 12 B master copy and moments per parameter, 8 B at ZeRO-0, "
                      "divided by stage) plus DeepSpeed's gradient buckets (reduce_bucket_size, 5e7 elements: "
                      "here larger than the model, so one more gradient-sized buffer at ZeRO-1/2), ZeRO-3's "
                      "gathered-parameter buffers, and allocator slack; with offload on a CPU machine the "
                      "offloaded states stay in the same RAM."]
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import deepspeed
    import transformers

    return f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}"


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def write_result(out: str | Path, stem_name: str, result: dict, markdown: str) -> None:
    """A benchmark's result as <out>/<stem_name>.json and .md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / stem_name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
