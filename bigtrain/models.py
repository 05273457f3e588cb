"""Build Hugging Face causal-LM models from a `model` config: any `transformers` family or a local folder."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from bigtrain.config.errors import ConfigError


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


def build_model(model_cfg: DictConfig, seed: int) -> torch.nn.Module:
    """Instantiate the model in fp32 on the CPU; the DeepSpeed engine moves and casts it.

    Random init is seeded so every rank (and a single-process reference) starts from the same weights.
    """
    config = build_model_config(model_cfg)
    attn = model_cfg.attn_implementation
    if model_cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained, dtype=torch.float32, attn_implementation=attn
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)


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

