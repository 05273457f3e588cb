"""`bigtrain plan`: what will fit before a GPU-hour is spent. For the composed model and layout and a
stated hardware, estimate per-rank memory of every ZeRO stage and offload choice (bigtrain/memory.py),
say which fit, and recommend one with the command line to run it."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from bigtrain.config.compose import compose
from bigtrain.config.validate import validate
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.errors import ConfigError
from bigtrain.tools.memory import CPU_RUNTIME_GB, GB, Estimate, ModelFacts, TrainingSetup, estimate

# (stage, offload) in the order of expected speed: each step down adds communication (ZeRO-3 gathers
# parameters every step) or host traffic (offload), so the first that fits is the recommendation.
CHOICES = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"),
           (3, "full"), (3, "nvme")]
# Share of a memory the estimate may fill: headroom for the OS, other processes and estimate error.
USABLE = 0.9


@dataclass(frozen=True)
class Hardware:
    nodes: int
    ranks_per_node: int
    device: str  # cuda or cpu
    device_memory_gb: float | None  # per GPU; None on the CPU
    cpu_memory_gb: float  # per node
    nvme_gb: float | None  # per node


@dataclass
class Option:
    stage: int
    offload: str
    estimate: Estimate | None
    fits: bool
    why: str

    @property
    def overrides(self) -> list[str]:
        return [f"zero=stage{self.stage}", f"offload={self.offload}"]


def model_facts(model_cfg: DictConfig) -> ModelFacts:
    """Sizes that memory depends on, from a weightless (meta-device) copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.components.models import build_model_config

    config = build_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        embeddings += output.weight.numel()
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return ModelFacts(
        parameters=parameters, largest_layer=largest, num_layers=config.num_hidden_layers, hidden_size=hidden,
        intermediate_size=intermediate, vocab_size=config.vocab_size, num_heads=config.num_attention_heads,
        gated_mlp=hasattr(config, "intermediate_size") and getattr(config, "hidden_act", "") in ("silu", "swish"),
        embedding_parameters=embeddings,
    )


def measure_import_gb() -> float:
    """Peak RSS of a fresh process after importing what every rank imports (torch, DeepSpeed,
    transformers, datasets): measured, not assumed, since it differs between builds and machines."""
    code = ("import torch, deepspeed, transformers, datasets; from bigtrain.monitor.metrics import peak_rss_gb; "
            "print(peak_rss_gb())")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise ConfigError(f"Could not measure the process baseline (importing torch/DeepSpeed failed): "
                          f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}. "
                          "Pass --baseline-gb to state it.")
    return float(proc.stdout.strip().splitlines()[-1])  # GB, as peak_rss_gb gives it


def this_machine(device: str | None) -> Hardware:
    """Defaults for the hardware not stated: this machine (every GPU, or 2 CPU ranks as `make train`)."""
    import psutil

    gpus, gpu_gb = 0, None
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_gb = torch.cuda.get_device_properties(0).total_memory / GB
    device = device or ("cuda" if gpus else "cpu")
    return Hardware(nodes=1, ranks_per_node=gpus or 2, device=device,
                    device_memory_gb=gpu_gb if device == "cuda" else None,
                    cpu_memory_gb=psutil.virtual_memory().total / GB, nvme_gb=None)


def setup_of(cfg: DictConfig, hardware: Hardware, stage: int, offload: str) -> TrainingSetup:
    world = hardware.nodes * hardware.ranks_per_node
    pp, tp = cfg.parallel.pipeline, cfg.parallel.tensor
    train = cfg.train
    return TrainingSetup(
        stage=stage, offload=offload, data=ProcessGrid.of(cfg, world).zero_partitions, pipeline=pp, tensor=tp,
        micro_batch=train.micro_batch_size, grad_accum=train.grad_accum, seq_len=train.seq_len,
        precision=cfg.precision.name, device=hardware.device, reduce_bucket=cfg.zero.reduce_bucket_size,
        eager_attention=cfg.model.attn_implementation == "eager", sequence=cfg.parallel.sequence,
        checkpointing=train.activation_checkpointing == "full", activation_offload=train.activation_offload,
        tiled_mlp=train.tiled_mlp, tiled_loss=train.tiled_loss,
    )


def plan(overrides: list[str], hardware: Hardware, process_gb: float) -> tuple[DictConfig, ModelFacts, list[Option]]:
    """Every (stage, offload) choice for the config of `overrides` on `hardware`, with its estimate."""
    world = hardware.nodes * hardware.ranks_per_node
    cfg = compose(overrides)
    validate(cfg, world, local_ranks=hardware.ranks_per_node)  # the layout itself must work on this many ranks
    facts = model_facts(cfg.model)
    options = []
    for stage, offload in CHOICES:
        options.append(_option(cfg, facts, hardware, process_gb, stage, offload))
    return cfg, facts, options


def _option(cfg, facts, hardware: Hardware, process_gb: float, stage: int, offload: str) -> Option:
    if cfg.parallel.pipeline > 1 and stage >= 2:
        return Option(stage, offload, None, False, "pipeline parallelism works with ZeRO-0/1 only")
    if offload == "nvme" and not hardware.nvme_gb:
        return Option(stage, offload, None, False, "no NVMe stated (--nvme GB)")
    est = estimate(facts, setup_of(cfg, hardware, stage, offload), process_gb, hardware.ranks_per_node)
    problems = []
    if hardware.device == "cpu":
        node_gb = est.device_gb * hardware.ranks_per_node
        if node_gb > USABLE * hardware.cpu_memory_gb:
            problems.append(f"{node_gb:.1f} GB per node > {USABLE:.0%} of {hardware.cpu_memory_gb:.1f} GB")
    else:
        if est.device_gb > USABLE * hardware.device_memory_gb:
            problems.append(f"{est.device_gb:.1f} GB per GPU > {USABLE:.0%} of {hardware.device_memory_gb:.1f} GB")
        host_gb = est.host_gb * hardware.ranks_per_node
        if host_gb > USABLE * hardware.cpu_memory_gb:
            problems.append(f"{host_gb:.1f} GB CPU memory per node > {USABLE:.0%} of {hardware.cpu_memory_gb:.1f} GB")
    if offload == "nvme":
        states = _nvme_bytes(facts, cfg, hardware, stage) * hardware.ranks_per_node / GB
        if states > USABLE * hardware.nvme_gb:
            problems.append(f"{states:.1f} GB on NVMe per node > {USABLE:.0%} of {hardware.nvme_gb:.1f} GB")
    return Option(stage, offload, est, not problems, "; ".join(problems) or "fits")


def _nvme_bytes(facts, cfg, hardware, stage) -> float:
    from bigtrain.tools.memory import model_state_bytes, shard_parameters

    layout = setup_of(cfg, hardware, stage, "nvme")
    return model_state_bytes(shard_parameters(facts, layout), facts.largest_layer, layout)[1]


def recommend(options: list[Option]) -> Option | None:
    return next((o for o in options if o.fits), None)


def launch_line(overrides: list[str], option: Option, hardware: Hardware) -> str:
    """The command that runs the recommended choice with the user's other overrides."""
    kept = [o for o in overrides if not o.startswith(("zero=", "offload="))]
    args = " ".join(_quote(a) for a in [*kept, *option.overrides])
    if option.offload == "nvme":
        args += " offload.nvme_path=/path/on/nvme"
    if hardware.nodes > 1:
        return f"launchers/multinode.sh hostfile {args}    # hostfile: {hardware.nodes} nodes, slots={hardware.ranks_per_node}"
    return f"deepspeed --num_gpus {hardware.ranks_per_node} --module bigtrain.train {args}"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def render(cfg: DictConfig, facts: ModelFacts, hardware: Hardware, options: list[Option],
           process_gb: float, overrides: list[str]) -> str:
    world = hardware.nodes * hardware.ranks_per_node
    pp, tp = cfg.parallel.pipeline, cfg.parallel.tensor
    cpu = hardware.device == "cpu"
    lines = [
        f"model {cfg.model.name}: {facts.parameters / 1e6:.1f}M parameters (largest layer "
        f"{facts.largest_layer / 1e6:.1f}M), {cfg.precision.name}, micro-batch {cfg.train.micro_batch_size} x "
        f"{cfg.train.seq_len} tokens, grad_accum {cfg.train.grad_accum}",
        f"layout: {world} rank(s) on {hardware.nodes} node(s) = data {ProcessGrid.of(cfg, world).data} x pipeline {pp} x tensor {tp}",
        (f"hardware: CPU ranks, {hardware.cpu_memory_gb:.1f} GB RAM per node" if cpu else
         f"hardware: {hardware.ranks_per_node} GPU(s) per node with {hardware.device_memory_gb:.1f} GB each, "
         f"{hardware.cpu_memory_gb:.1f} GB RAM per node")
        + (f", {hardware.nvme_gb:.0f} GB NVMe" if hardware.nvme_gb else ""),
        f"per-rank process: {process_gb:.2f} GB (imports measured now, plus DeepSpeed's and the data's runtime)",
        "",
    ]
    if cpu:
        lines.append(f"{'choice':<28}{'states':>8}{'activ.':>8}{'buffers':>9}{'process':>9}{'per rank':>10}"
                     f"{'per node':>10}  fits")
    else:
        lines.append(f"{'choice':<28}{'states':>8}{'activ.':>8}{'buffers':>9}{'reserve':>9}{'per GPU':>10}"
                     f"{'CPU/node':>10}  fits")
    for o in options:
        name = " ".join(o.overrides)
        if o.estimate is None:
            lines.append(f"{name:<28}{'':>54}  no: {o.why}")
            continue
        d = {k: v / GB for k, v in o.estimate.device.items()}
        buffers = d.get("ZeRO buckets", 0) + d.get("ZeRO-3 gathers", 0)
        last = d.get("process", 0) if cpu else d.get("CUDA reserve", 0)
        second = o.estimate.device_gb * hardware.ranks_per_node if cpu else o.estimate.host_gb * hardware.ranks_per_node
        verdict = "yes" if o.fits else f"no: {o.why}"
        lines.append(f"{name:<28}{d.get('model states', 0):>8.2f}{d.get('activations', 0):>8.2f}{buffers:>9.2f}"
                     f"{last:>9.2f}{o.estimate.device_gb:>10.2f}{second:>10.2f}  {verdict}")
    lines.append("")
    lines.append("GB = 1e9 bytes. " + ("On the CPU a rank's memory is its peak RSS: every column counts there, "
                                        "offloaded states included." if cpu else
                                        "Offloaded states are in CPU/node; per GPU is device memory."))
    best = recommend(options)
    if best is None:
        lines.append("Nothing fits: add ranks or nodes, lower train.micro_batch_size or train.seq_len, "
                     "or use a smaller model.")
    else:
        lines.append(f"recommended: {' '.join(best.overrides)} (the fastest choice that fits: least "
                     "communication and offload traffic)")
        lines.append(f"  {launch_line(overrides, best, hardware)}")
    return "\n".join(lines)


def as_json(cfg, facts: ModelFacts, hardware: Hardware, options: list[Option], process_gb: float) -> str:
    best = recommend(options)
    return json.dumps({
        "model": cfg.model.name, "parameters": facts.parameters, "hardware": hardware.__dict__,
        "process_gb": process_gb,
        "options": [{"zero": o.stage, "offload": o.offload, "fits": o.fits, "why": o.why,
                     "per_rank_gb": o.estimate.device_gb if o.estimate else None,
                     "host_gb": o.estimate.host_gb if o.estimate else None,
                     "components_gb": {k: v / GB for k, v in o.estimate.device.items()} if o.estimate else None}
                    for o in options],
        "recommended": best.overrides if best else None,
    }, indent=2)


def process_baseline_gb(stated: float | None) -> float:
    """A rank's memory before its model: `stated`, else the measured imports plus the runtime."""
    return stated if stated is not None else measure_import_gb() + CPU_RUNTIME_GB
