"""Refuse configs that cannot work, before any process group, model or engine exists.

Each check raises ConfigError with one paragraph: what is wrong, the value seen, and what to change.
Checks that need the model's or tokenizer's config read only those small files, never weights.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bigtrain.config.derived import resolve_device
from bigtrain.config.machine import check_machine
from bigtrain.config.options import (
    BIGTRAIN_EXCHANGES,
    COMM_OPTIONS,
    OFFLOAD_DEVICES,
    OPTIMIZERS,
    OUTER_OPTIMIZERS,
    PRECISIONS,
    REMOVED_DEEPSPEED_KEYS,
    SCHEDULERS,
    ZEROPP_COMM,
)
from bigtrain.config.values import check_choices, check_deepspeed_section, check_keys, check_numbers
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.errors import ConfigError


def validate(cfg: DictConfig, world_size: int, this_machine: bool = True, local_ranks: int | None = None) -> None:
    """Raise ConfigError for the first problem found in `cfg` for a job of `world_size` processes.
    `this_machine=False` checks a config meant for another kind of machine (`bigtrain config --device
    cuda`): what this one has (GPUs, toolkits, libraries) is not checked. `local_ranks`: how many of the
    processes run on this machine, where that is not all of them (a multi-node launch)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"The job's number of processes must be 1 or more, got {world_size!r}.")
    check_keys(cfg)
    _check_complete(cfg)
    check_numbers(cfg)
    check_choices(cfg)
    check_deepspeed_section(cfg)
    _check_positive(cfg)
    _check_comm(cfg, world_size)
    _check_layout(cfg, world_size)
    _check_global_batch(cfg, world_size)
    _check_zero_and_offload(cfg)
    _check_precision(cfg)
    _check_optimizer(cfg)
    _check_deepspeed_extra(cfg)
    _check_logging(cfg)
    _check_data(cfg)
    _check_model_and_tokenizer(cfg)
    if this_machine:
        check_machine(cfg, world_size, local_ranks)


def _check_complete(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"Missing required value for {', '.join(repr(k) for k in missing)}. "
            f"Set it on the command line, e.g. {missing[0]}=VALUE."
        )


def _check_positive(cfg: DictConfig) -> None:
    sizes = {
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.seq_len": cfg.train.seq_len,
        "parallel.pipeline": cfg.parallel.pipeline,
        "parallel.tensor": cfg.parallel.tensor,
        "parallel.sequence": cfg.parallel.sequence,
        "logging.interval": cfg.logging.interval,
        "checkpoint.keep": cfg.checkpoint.keep,
        "optimizer.lr": cfg.optimizer.lr,
        "fault.max_nonfinite_steps": cfg.fault.max_nonfinite_steps,
        "fault.max_overflow_steps": cfg.fault.max_overflow_steps,
    }
    if cfg.data.max_samples is not None:
        sizes["data.max_samples"] = cfg.data.max_samples
    if cfg.train.global_batch_size is not None:
        sizes["train.global_batch_size"] = cfg.train.global_batch_size
    for key, value in sizes.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}. Set {key} to a value above 0.")
    if cfg.fault.collective_timeout_s <= 0:
        raise ConfigError(
            f"fault.collective_timeout_s must be positive, got {cfg.fault.collective_timeout_s}. "
            "It bounds how long a collective waits for a dead peer; a few minutes suits most jobs."
        )
    for key in ("checkpoint.interval", "scheduler.warmup_steps", "optimizer.grad_clip", "fault.hang_timeout_s"):
        value = OmegaConf.select(cfg, key)
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}. Use 0 to turn it off.")


def _check_layout(cfg: DictConfig, world_size: int) -> None:
    pp, tp, sp = cfg.parallel.pipeline, cfg.parallel.tensor, cfg.parallel.sequence
    if world_size % (pp * tp * sp):
        raise ConfigError(
            f"{world_size} processes cannot be split into pipeline={pp} x tensor={tp} x sequence={sp} groups "
            f"(world = data x pipeline x tensor x sequence). Launch a multiple of {pp * tp * sp} processes or "
            "change parallel.pipeline/tensor/sequence."
        )
    if sp > 1 and (pp > 1 or tp > 1):
        other = "pipeline" if pp > 1 else "tensor"
        raise ConfigError(
            f"parallel.sequence={sp} with parallel.{other}={pp if pp > 1 else tp}: DeepSpeed's Ulysses runs on a "
            f"data x sequence grid of whole models; it does not nest inside {other} parallelism. Combine sequence "
            f"parallelism with data parallelism and ZeRO (zero=stage3 spreads the weights): parallel.{other}=1."
        )
    if pp > 1 and tp > 1:
        raise ConfigError(
            f"parallel.pipeline={pp} with parallel.tensor={tp}: DeepSpeed's tensor parallelism (AutoTP) "
            "builds a two-axis data x tensor grid and cannot be nested inside pipeline stages. Combine "
            "either one with data parallelism: parallel.tensor=1 or parallel.pipeline=1."
        )
    if pp > 1 and cfg.zero.stage >= 2:
        raise ConfigError(
            f"parallel.pipeline={pp} with zero=stage{cfg.zero.stage}: ZeRO-2 and ZeRO-3 partition "
            "gradients, which pipeline parallelism cannot work with (DeepSpeed refuses it). Use zero=stage1 "
            "(or stage0) with pipeline parallelism."
        )
    if pp > 1 and cfg.zero.stage == 0 and cfg.optimizer.grad_clip > 0:
        raise ConfigError(
            f"parallel.pipeline={pp} with zero=stage0 and optimizer.grad_clip={cfg.optimizer.grad_clip}: "
            "at ZeRO-0 DeepSpeed clips each pipeline stage by its own gradient norm instead of the whole "
            "model's, so training would drift from what the config says. Use zero=stage1 (which clips by "
            "the global norm), or optimizer.grad_clip=0."
        )
    if tp > 1 and cfg.zero.stage == 0:
        raise ConfigError(
            f"parallel.tensor={tp} with zero=stage0: a tensor-parallel checkpoint is exported (and resumed "
            "on other layouts) through DeepSpeed's universal format, which is built from the optimizer "
            "shards ZeRO writes; ZeRO-0 writes none. Use zero=stage1 (or 2, 3) with tensor parallelism."
        )
    method = cfg.parallel.pipeline_partition
    if method not in ("parameters", "uniform") and not (method.startswith("type:") and len(method) > 5):
        raise ConfigError(
            f"parallel.pipeline_partition={method!r} is not a partition method. Use parameters, uniform, "
            "or type:REGEX to balance the layers whose class name matches REGEX (e.g. type:DecoderLayer)."
        )
    _check_memory_levers(cfg)


def _check_memory_levers(cfg: DictConfig) -> None:
    """Activation checkpointing, its offload, and tiling."""
    train, pp = cfg.train, cfg.parallel.pipeline
    if train.activation_checkpointing not in ("none", "full"):
        raise ConfigError(
            f"train.activation_checkpointing={train.activation_checkpointing!r}: use none, or full (recompute each "
            "decoder layer's activations in the backward pass)."
        )
    if train.activation_offload and (train.activation_checkpointing != "full" or pp > 1):
        raise ConfigError(
            "train.activation_offload=true moves the layer inputs that activation checkpointing keeps to host "
            "memory: it needs train.activation_checkpointing=full, and is not available with parallel.pipeline>1."
        )
    for key in ("tiled_mlp", "tiled_loss"):
        if train[key] < 0:
            raise ConfigError(f"train.{key} must be 0 (off) or a number of pieces, got {train[key]}.")
        if train[key] > 1 and pp > 1:
            raise ConfigError(f"train.{key}={train[key]} with parallel.pipeline={pp}: tiling is for the whole-model "
                              f"layouts (data, sequence, tensor). Use train.{key}=0 with pipeline parallelism.")
        if train[key] > 1 and cfg.train.seq_len // cfg.parallel.sequence < train[key]:
            raise ConfigError(f"train.{key}={train[key]} pieces for a sequence of {cfg.train.seq_len // cfg.parallel.sequence} "
                              "tokens per rank: use at most that many pieces.")


def _check_global_batch(cfg: DictConfig, world_size: int) -> None:
    dp = ProcessGrid.of(cfg, world_size).data
    mb, ga, gbs = cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.global_batch_size
    if gbs is not None and gbs != mb * ga * dp:
        hint = (
            f"e.g. train.grad_accum={gbs // (mb * dp)}"
            if gbs % (mb * dp) == 0
            else f"it must be a multiple of micro_batch_size x data-parallel ranks = {mb * dp}"
        )
        raise ConfigError(
            f"train.global_batch_size={gbs} cannot hold with {dp} data-parallel ranks: "
            f"micro_batch_size {mb} x grad_accum {ga} x {dp} ranks = {mb * ga * dp}. "
            f"Change train.grad_accum or train.micro_batch_size ({hint}), or unset train.global_batch_size."
        )


def _check_comm(cfg: DictConfig, world_size: int) -> None:
    """Gradient compression only where it is sound; checked before the layout, so that a refused
    combination with model parallelism names the compression, not the layout."""
    comm, name = cfg.comm, cfg.comm.name
    if name not in COMM_OPTIONS:
        raise ConfigError(f"comm={name!r} is unknown. Use one of {sorted(COMM_OPTIONS)}.")
    _check_comm_knobs(comm)
    if name == "none":
        return
    if cfg.parallel.pipeline > 1:
        raise ConfigError(
            f"comm={name} with parallel.pipeline={cfg.parallel.pipeline}: gradient compression is not "
            "supported with pipeline parallelism (DeepSpeed's pipeline engine reduces gradients in its "
            "own schedule, which neither DeepSpeed's comm options nor bigtrain's exchange reach). Use "
            "comm=none, or parallel.pipeline=1."
        )
    if comm.warmup_steps > 0 and name not in BIGTRAIN_EXCHANGES:
        raise ConfigError(
            f"comm.warmup_steps={comm.warmup_steps} with comm={name}: a warm-up of uncompressed steps "
            f"exists only for {', '.join(sorted(BIGTRAIN_EXCHANGES))}; DeepSpeed applies comm={name} "
            "from the first step to the last. Remove comm.warmup_steps."
        )
    if name in ZEROPP_COMM:
        _check_zeropp(cfg, world_size)
    elif name in BIGTRAIN_EXCHANGES:
        _check_bigtrain_exchange(cfg)


def _check_comm_knobs(comm: DictConfig) -> None:
    for key in ("low_rank", "sync_every"):
        if comm[key] < 1:
            raise ConfigError(f"comm.{key} must be 1 or more, got {comm[key]}. Set comm.{key} to a value above 0.")
    for key in ("warmup_steps", "hpz_partition_size"):
        if comm[key] < 0:
            raise ConfigError(f"comm.{key} must be 0 or more, got {comm[key]}.")
    if comm.outer_optimizer not in OUTER_OPTIMIZERS:
        raise ConfigError(
            f"comm.outer_optimizer={comm.outer_optimizer!r} is unknown. Use none (plain averaging) or "
            "nesterov (DiLoCo's outer step)."
        )
    if comm.outer_lr <= 0 or not 0 <= comm.outer_momentum < 1:
        raise ConfigError(
            f"comm.outer_lr={comm.outer_lr} and comm.outer_momentum={comm.outer_momentum}: the outer "
            "learning rate must be positive and the momentum in [0, 1); DiLoCo uses 0.7 and 0.9."
        )


def _check_zeropp(cfg: DictConfig, world_size: int) -> None:
    comm = cfg.comm
    if cfg.zero.stage != 3:
        raise ConfigError(
            f"comm={comm.name} is ZeRO++, an extension of ZeRO stage 3, but the config has "
            f"zero=stage{cfg.zero.stage}. Use zero=stage3, or comm=fp16_reduce/bf16_reduce to cut "
            "gradient bytes at this stage."
        )
    if resolve_device(cfg) == "cpu" and (comm.quantized_weights or comm.quantized_gradients):
        raise ConfigError(
            f"comm={comm.name} quantizes weights (comm.quantized_weights={str(comm.quantized_weights).lower()}) "
            f"and gradients (comm.quantized_gradients={str(comm.quantized_gradients).lower()}) with DeepSpeed kernels "
            "that exist only for GPUs ('This op had not been implemented on CPU backend'). On a CPU use "
            "comm=zeropp_hpz (hierarchical partitioning only), or set both to false."
        )
    hpz = comm.hpz_partition_size
    if hpz > 1 and world_size % hpz:
        raise ConfigError(
            f"comm.hpz_partition_size={hpz} does not divide the {world_size} ranks of the job: every "
            "rank must belong to one secondary-partition group. Use the number of ranks per node, or "
            "0 to take it from the launcher."
        )


def _check_bigtrain_exchange(cfg: DictConfig) -> None:
    comm = cfg.comm
    if cfg.zero.stage != 0:
        raise ConfigError(
            f"comm={comm.name} needs zero=stage0, but the config has zero=stage{cfg.zero.stage}: bigtrain "
            "replaces DeepSpeed's gradient all-reduce with its own exchange, and only at ZeRO-0 is that "
            "a plain all-reduce of whole gradients; ZeRO-1/2/3 reduce-scatter gradients into optimizer "
            "partitions inside DeepSpeed. Use zero=stage0, or comm=fp16_reduce/bf16_reduce (any stage)."
        )
    if cfg.precision.name != "fp32":
        raise ConfigError(
            f"comm={comm.name} needs precision=fp32, but the config has precision={cfg.precision.name}: "
            "with bf16 or fp16 at ZeRO-0, DeepSpeed's optimizer wrapper shards the fp32 master weights "
            "and all-gathers them every step (bf16), or rescales gradients by a changing loss scale that "
            "the error-feedback memory would not follow (fp16). Use precision=fp32, or comm=bf16_reduce."
        )
    if cfg.parallel.tensor > 1:
        raise ConfigError(
            f"comm={comm.name} with parallel.tensor={cfg.parallel.tensor}: bigtrain's exchange treats "
            "every rank as a data-parallel replica of the whole model. Use parallel.tensor=1, or "
            "comm=fp16_reduce/bf16_reduce."
        )
    if cfg.parallel.sequence > 1:
        raise ConfigError(
            f"comm={comm.name} with parallel.sequence={cfg.parallel.sequence}: bigtrain's exchange averages "
            "whole gradients over every rank as a data-parallel replica, but sequence-parallel ranks hold "
            "pieces of one sequence, whose gradients DeepSpeed sums over the sequence group. Use "
            "parallel.sequence=1, or comm=fp16_reduce/bf16_reduce."
        )
    every = comm.sync_every
    if comm.name == "local_sgd" and cfg.checkpoint.interval % every:
        raise ConfigError(
            f"checkpoint.interval={cfg.checkpoint.interval} is not a multiple of comm.sync_every={every}: "
            "with comm=local_sgd the replicas differ between syncs, and a checkpoint holds rank 0's "
            f"replica only. Use a checkpoint.interval that is a multiple of {every} (or 0)."
        )


def _check_zero_and_offload(cfg: DictConfig) -> None:
    stage, off = cfg.zero.stage, cfg.offload
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage must be 0, 1, 2 or 3, got {stage}. Pick zero=stage0..stage3.")
    for key in ("optimizer", "param"):
        if off[key] not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"offload.{key}={off[key]!r} is not a place DeepSpeed can offload to. "
                f"Use one of {sorted(OFFLOAD_DEVICES)}."
            )
    if off.optimizer == "nvme" and stage != 3:
        raise ConfigError(
            f"offload={off.name} puts optimizer states on NVMe, which DeepSpeed does only at ZeRO stage 3 "
            f"(at zero=stage{stage} it would silently keep them in CPU RAM). Use zero=stage3, or "
            "offload=optimizer for CPU RAM."
        )
    if off.param != "none" and stage != 3:
        raise ConfigError(
            f"offload={off.name} moves parameters off the device, which only ZeRO stage 3 can do; "
            f"the config has zero=stage{stage}. Use zero=stage3, or offload=optimizer to offload "
            "optimizer states only."
        )
    if off.optimizer != "none" and stage == 0:
        raise ConfigError(
            f"offload={off.name} needs ZeRO to partition the optimizer, but the config has "
            "zero=stage0. Use zero=stage1, stage2 or stage3 with offload, or offload=none."
        )
    if "nvme" in (off.optimizer, off.param):
        if not off.nvme_path or not Path(off.nvme_path).is_dir():
            raise ConfigError(
                f"NVMe offload needs offload.nvme_path to be an existing folder on a fast disk; got "
                f"{off.nvme_path!r}. Create the folder and pass offload.nvme_path=/path/to/it."
            )


def _check_precision(cfg: DictConfig) -> None:
    name = cfg.precision.name
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name!r} is unknown. Use one of {sorted(PRECISIONS)}.")
    device = resolve_device(cfg)
    if name == "fp16" and device == "cpu":
        raise ConfigError(
            "precision=fp16 needs a GPU: DeepSpeed's CPU backend does not support fp16 training "
            "('Type fp16 is not supported on your device'). Use precision=fp32, or precision=bf16 "
            "on a CPU with bf16 units."
        )


def _check_optimizer(cfg: DictConfig) -> None:
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={cfg.optimizer.name!r} is not supported. Use one of {sorted(OPTIMIZERS)}."
        )
    if cfg.scheduler.name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler.name={cfg.scheduler.name!r} is not supported. Use one of {sorted(SCHEDULERS)}."
        )
    if not 0.0 < cfg.scheduler.decay_fraction <= 1.0 or cfg.scheduler.decay_shape not in ("linear", "cosine"):
        raise ConfigError(
            f"scheduler.decay_fraction={cfg.scheduler.decay_fraction} and scheduler.decay_shape="
            f"{cfg.scheduler.decay_shape!r}: the fraction is in (0, 1] (the last share of train.max_steps over "
            "which wsd decays), the shape linear or cosine."
        )


def _check_deepspeed_extra(cfg: DictConfig) -> None:
    removed = REMOVED_DEEPSPEED_KEYS & set(cfg.deepspeed.keys())
    if removed:
        raise ConfigError(
            f"deepspeed.{sorted(removed)[0]} names a feature DeepSpeed 0.19 removed; DeepSpeed would "
            "refuse the whole config. Delete that key from the `deepspeed` section."
        )


def _check_logging(cfg: DictConfig) -> None:
    """Sinks, the profiler and the MFU peak."""
    logging = cfg.logging
    if logging.peak_tflops is not None and logging.peak_tflops <= 0:
        raise ConfigError(
            f"logging.peak_tflops must be positive, got {logging.peak_tflops}. Give one device's peak "
            "TFLOP/s in the training precision, or leave it unset to use a known GPU's or a measured one."
        )
    if logging.flops_profile_step < 0 or logging.flops_profile_step > cfg.train.max_steps:
        raise ConfigError(
            f"logging.flops_profile_step={logging.flops_profile_step} is not a step of this run (1 to "
            f"train.max_steps={cfg.train.max_steps}). Pick a step after the first few, or 0 for no profile."
        )
    if logging.flops_profile_step and cfg.zero.stage == 3:
        raise ConfigError(
            f"logging.flops_profile_step={logging.flops_profile_step} with zero=stage3: DeepSpeed's flops "
            "profiler counts only the parameters a rank holds under ZeRO-3, so its numbers would be wrong. "
            "Profile with zero=stage2 (same model, same FLOPs), or set logging.flops_profile_step=0."
        )
    if logging.wandb:
        from bigtrain.monitor.sinks import WANDB_INSTALL_HINT, wandb_installed

        if logging.wandb_mode not in ("offline", "online"):
            raise ConfigError(
                f"logging.wandb_mode={logging.wandb_mode!r} is not a W&B mode. Use offline (no network; "
                "`wandb sync` uploads later) or online."
            )
        if not wandb_installed():
            raise ConfigError(
                f"logging.wandb=true needs the wandb package, which is not installed. Install it with "
                f"{WANDB_INSTALL_HINT}, or set logging.wandb=false."
            )
    if cfg.sweep.ranks <= 0:
        raise ConfigError(f"sweep.ranks must be positive, got {cfg.sweep.ranks}. Use 1 to train trials in-process.")


def _check_data(cfg: DictConfig) -> None:
    """Data settings, before the source itself is looked at (_check_model_and_tokenizer)."""
    from bigtrain.components.data.formats import FORMATS

    data = cfg.data
    if data.format not in FORMATS:
        raise ConfigError(f"data.format={data.format!r} is not a data format. Use one of {', '.join(FORMATS)}.")
    if data.too_long not in ("truncate", "drop"):
        raise ConfigError(f"data.too_long={data.too_long!r}: use truncate or drop.")
    if not 0.0 <= data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={data.validation_fraction} must be in [0, 1): the share of "
                          "documents held out for evaluation.")
    for key in ("data.prepare_workers", "eval.interval"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {OmegaConf.select(cfg, key)}.")
    if cfg.eval.batches < 1:
        raise ConfigError(f"eval.batches must be 1 or more, got {cfg.eval.batches} (eval.interval=0 turns evaluation off).")
    crossing = data.cross_document_attention if data.cross_document_attention is not None else data.format == "text"
    if not crossing and data.packing and cfg.parallel.pipeline > 1:
        raise ConfigError(
            f"Packed documents that do not attend to each other (data.format={data.format}, "
            f"data.cross_document_attention={str(crossing).lower()}) with parallel.pipeline={cfg.parallel.pipeline}: "
            "pipeline stages rebuild positions and masks on their own, so they cannot restart them at documents. "
            "Use data.packing=false (one document per sample), or data.cross_document_attention=true."
        )
    if not Path(data.tokenizer).is_dir():
        raise ConfigError(
            f"Tokenizer folder {data.tokenizer!r} (data.tokenizer) does not exist. Point "
            "data.tokenizer at a local folder saved with tokenizer.save_pretrained()."
        )


def _check_model_and_tokenizer(cfg: DictConfig) -> None:
    from bigtrain.components.data.sources import check_sources
    from bigtrain.components.data.tokenizer import load_tokenizer
    from bigtrain.components.lora import check_lora
    from bigtrain.components.models import build_model_config, check_model_config, max_positions, special_token_ids

    model_config = build_model_config(cfg.model, special_token_ids(cfg.data.tokenizer))  # the config training builds
    check_lora(cfg, check_model_config(cfg.model, model_config))
    limit = max_positions(model_config)
    if limit is not None and cfg.train.seq_len > limit:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is longer than model {cfg.model.name} supports "
            f"({limit} positions). Lower train.seq_len to at most {limit}."
        )
    _check_model_parallel(cfg, model_config)
    tokenizer_size = len(load_tokenizer(cfg.data.tokenizer))
    if tokenizer_size > model_config.vocab_size:
        raise ConfigError(
            f"The tokenizer at {cfg.data.tokenizer} has {tokenizer_size} tokens but model "
            f"{cfg.model.name} has only vocab_size={model_config.vocab_size} embeddings; token ids "
            f"would fall outside the table. Set ++model.hf_config.vocab_size={tokenizer_size} (or "
            "larger), or use a tokenizer that matches the model (data.tokenizer)."
        )
    check_sources(cfg, model_config.vocab_size)



def _check_model_parallel(cfg: DictConfig, model_config) -> None:
    """Pipeline, tensor and sequence degrees against the model's shape."""
    pp, tp = cfg.parallel.pipeline, cfg.parallel.tensor
    family, name = model_config.model_type, cfg.model.name
    if cfg.parallel.sequence > 1:
        from bigtrain.distributed.sequence import check_sequence_parallel

        check_sequence_parallel(cfg, model_config)
    if pp > 1:
        from bigtrain.distributed.pipeline import check_pipeline_support, layer_type_names

        check_pipeline_support(family)
        layers = model_config.num_hidden_layers
        if layers < pp:
            raise ConfigError(
                f"parallel.pipeline={pp} stages need at least {pp} decoder layers, but model {name} has "
                f"{layers}. Lower parallel.pipeline to at most {layers}."
            )
        method = cfg.parallel.pipeline_partition
        if method.startswith("type:"):
            import re

            names = layer_type_names(family, layers)
            try:
                matched = [n for n in names if re.search(method[5:], n, re.IGNORECASE)]
            except re.error as err:
                raise ConfigError(f"parallel.pipeline_partition={method!r}: bad regular expression ({err}).") from None
            if len(matched) < pp:
                raise ConfigError(
                    f"parallel.pipeline_partition={method!r} matches {len(matched)} layer(s) of model "
                    f"{name}, fewer than the {pp} stages. Its layers are {sorted(set(names))}; match the "
                    "decoder layers (e.g. type:DecoderLayer) or use parameters."
                )
    if tp > 1:
        from bigtrain.distributed.tensor import check_tensor_parallel

        check_tensor_parallel(model_config, name, tp)
