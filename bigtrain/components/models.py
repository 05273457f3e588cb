"""Build Hugging Face causal-LM models from a `model` config: any `transformers` family or a local folder."""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights

from bigtrain.errors import ConfigError


def build_model_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The transformers config for `model_cfg`, reading only small JSON files."""
    if model_cfg.pretrained:
        folder = Path(model_cfg.pretrained)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={model_cfg.pretrained!r} is not a Hugging Face model folder "
                "(no config.json there). Point it at a folder written by save_pretrained() or "
                "`bigtrain export`."
            )
        return AutoConfig.from_pretrained(folder)
    try:
        return AutoConfig.for_model(model_cfg.family, **OmegaConf.to_container(model_cfg.hf_config))
    except ValueError as err:
        raise ConfigError(
            f"model.family={model_cfg.family!r} is not a model type transformers knows ({err}). "
            "Use a Hugging Face model_type such as llama, gpt2, mistral or qwen2."
        ) from None


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_model(model_cfg: DictConfig, seed: int, ds_config: dict | None = None) -> torch.nn.Module:
    """Instantiate the model in fp32 on the CPU; the DeepSpeed engine moves and casts it.

    Under ZeRO-3 (`ds_config` given with stage 3) the model is built already partitioned, through
    transformers' DeepSpeed integration (deepspeed.zero.Init): no rank ever holds the whole model, so
    a model larger than one rank's memory, offloaded to CPU or NVMe, can be built at all.

    A fresh model is initialised by transformers' own init, run once from `seed` after construction
    (torch's default init is skipped): the same weights whether or not the model is partitioned,
    on every rank and in a single-process reference.
    """
    config = build_model_config(model_cfg)
    attn = model_cfg.attn_implementation
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        _keep_zero3_config(ds_config)
    if model_cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained, dtype=torch.float32, attn_implementation=attn
        )
    torch.manual_seed(seed)
    if zero3:  # transformers skips torch's init and runs its own, gathered module by module
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.init_weights()
    return model


_zero3_config = None


def _keep_zero3_config(ds_config: dict) -> None:
    """transformers partitions models at construction while an HfDeepSpeedConfig is alive (it keeps
    only a weak reference); keep it for the life of the process, as its ZeRO-3 code paths (loading,
    generation) consult it later too."""
    global _zero3_config
    from transformers.integrations import HfDeepSpeedConfig

    _zero3_config = HfDeepSpeedConfig(ds_config)


@dataclass(frozen=True)
class ModelShape:
    """What throughput and FLOP accounting need to know of a model, whatever its layout."""

    parameters: int
    matmul_parameters: int
    num_layers: int
    hidden_size: int
    largest_parameter: int
    """Elements of the biggest single parameter tensor (usually the embedding)."""


def model_shape(model_cfg: DictConfig) -> ModelShape:
    """The whole model's sizes, from a weightless (meta-device) copy built from the config: counts do
    not depend on how the trained copy is partitioned (ZeRO-3), split into stages or sharded."""
    config = build_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        matmul_parameters=matmul_parameters(model),
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        largest_parameter=max(p.numel() for p in model.parameters()),
    )


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix multiplies: all of them except embedding lookups
    (an embedding table used as the tied output head does multiply, so it is counted once)."""
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    lookup = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )
    tied = has_tied_output(model)
    return total - lookup + (model.get_output_embeddings().weight.numel() if tied else 0)


def has_tied_output(model: torch.nn.Module) -> bool:
    """Whether the output head shares its weight with the input embedding table."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight

