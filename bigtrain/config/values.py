"""Checks of single values against the schema: no key the schema does not have, numbers in their
ranges, strings among their choices, and no DeepSpeed escape-hatch key that contradicts what bigtrain
derives itself. Each raises ConfigError with one paragraph naming the key and the fix."""

import dataclasses
import math
import typing

from omegaconf import DictConfig, OmegaConf

from bigtrain.config.schema import BigtrainConfig
from bigtrain.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# DeepSpeed config keys bigtrain derives from its own keys (config/deepspeed.py): setting them under
# `deepspeed.` would make the engine run something other than what bigtrain planned, checked and
# checkpoints. Each names the bigtrain key to use instead.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size (or train.micro_batch_size and train.grad_accum)",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer": "optimizer.* (optimizer.lr, optimizer.betas, ...)",
    "scheduler": "scheduler=... (bigtrain passes its own learning-rate schedule to the engine)",
    "bf16": "precision=bf16",
    "fp16": "precision=fp16",
    "zero_optimization.stage": "zero=stage0..stage3",
    "zero_optimization.offload_optimizer": "offload=optimizer|full|nvme|nvme_optimizer",
    "zero_optimization.offload_param": "offload=full|nvme",
    "tensor_parallel": "parallel.tensor",
    "sequence_parallel_size": "parallel.sequence",
    "activation_checkpointing": "train.activation_checkpointing",
    "communication_data_type": "comm=fp16_reduce|bf16_reduce",
    "checkpoint": "checkpoint.* (bigtrain decides how a checkpoint is loaded)",
}


def check_keys(cfg: DictConfig) -> None:
    """Every section of the schema is present, and no key outside it was added (`+train.max_step=5`
    would otherwise be accepted and read by nobody). Free-form dicts (model.hf_config, deepspeed)
    take any key."""
    _check_node(cfg, BigtrainConfig, "")


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            where = f"{prefix}{key}"
            raise ConfigError(
                f"Unknown config key '{where}': the schema (bigtrain/config/schema.py) has no such key, so "
                f"nothing would read it. Check its spelling against `bigtrain config --show yaml` (keys under "
                f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(sorted(fields))}); extra DeepSpeed "
                "settings go under deepspeed.*, extra model settings under model.hf_config.*."
            )
    for name, field in fields.items():
        if dataclasses.is_dataclass(field.type):
            child = node.get(name) if name in node else None
            if not isinstance(child, DictConfig):
                raise ConfigError(
                    f"The config section '{prefix}{name}' is missing or not a section (got {child!r}): "
                    f"bigtrain needs it. Remove the override that deleted or replaced it (e.g. ~{prefix}{name} "
                    f"or {prefix}{name}=null)."
                )
            _check_node(child, field.type, f"{prefix}{name}.")


def check_numbers(cfg: DictConfig) -> None:
    """Every float is a number (no nan, no inf) and each bounded value is in its range."""
    _check_finite(cfg, BigtrainConfig, "")
    opt, sched = cfg.optimizer, cfg.scheduler
    _at_least("optimizer.eps", opt.eps, 0.0, strictly=True, hint="e.g. 1e-8")
    _at_least("optimizer.weight_decay", opt.weight_decay, 0.0, hint="0 turns weight decay off")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise ConfigError(
            f"optimizer.betas={list(opt.betas)} must be two values in [0, 1): Adam's decay rates of the first "
            "and second moments, e.g. optimizer.betas=[0.9,0.95]."
        )
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"scheduler.min_lr_ratio={sched.min_lr_ratio} must be in [0, 1]: the floor of the decay as a "
            "fraction of optimizer.lr (0 decays to zero, 1 keeps the learning rate constant)."
        )


def _check_finite(node: DictConfig, schema: type, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        value, kind = node.get(field.name), hints[field.name]
        if dataclasses.is_dataclass(kind):
            _check_finite(value, kind, f"{prefix}{field.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{prefix}{field.name}={value} is not a finite number. Give it a real value (see "
                "bigtrain/config/schema.py for what it means)."
            )
        elif field.name == "betas" and any(not math.isfinite(v) for v in value):
            raise ConfigError(f"{prefix}{field.name}={list(value)} holds a value that is not a finite number.")


def _at_least(key: str, value: float, floor: float, strictly: bool = False, hint: str = "") -> None:
    if value < floor or (strictly and value == floor):
        bound = f"above {floor:g}" if strictly else f"{floor:g} or more"
        raise ConfigError(f"{key}={value} must be {bound}{f' ({hint})' if hint else ''}.")


def check_choices(cfg: DictConfig) -> None:
    if cfg.train.device not in DEVICES:
        raise ConfigError(
            f"train.device={cfg.train.device!r} is not a device bigtrain trains on. Use auto (a GPU when one "
            "is visible, else the CPU), cpu or cuda."
        )
    if cfg.logging.deepspeed_level not in LOG_LEVELS:
        raise ConfigError(
            f"logging.deepspeed_level={cfg.logging.deepspeed_level!r} is not a log level. Use one of "
            f"{', '.join(LOG_LEVELS)}."
        )
    check_attention(cfg.model.attn_implementation)


def check_attention(name: str) -> None:
    if name in COMMON_ATTENTION:
        return
    attention = attention_implementations()
    if name not in attention:
        raise ConfigError(
            f"model.attn_implementation={name!r} is not an attention kernel transformers "
            f"knows. Use one of {', '.join(attention)} (sdpa is the default and runs everywhere)."
        )


# Kernels every transformers release bigtrain supports knows by name: accepted without importing it
# (seconds of every `bigtrain config`); any other name is looked up in transformers' own registry.
COMMON_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def attention_implementations() -> list[str]:
    """The attention kernels transformers can be asked for by name."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *sorted(k for k in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in k)]


def check_deepspeed_section(cfg: DictConfig) -> None:
    """The `deepspeed` escape hatch may add what bigtrain has no key for, not change what it owns."""
    extra = OmegaConf.to_container(cfg.deepspeed)
    for path, use in OWNED_DEEPSPEED_KEYS.items():
        node = extra
        for part in path.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(
                f"deepspeed.{path} is set, but bigtrain derives it from its own config (`bigtrain config` prints "
                f"the result); a different value would make DeepSpeed run something other than what bigtrain "
                f"checked and checkpoints. Remove it and use {use}."
            )


_ABSENT = object()
