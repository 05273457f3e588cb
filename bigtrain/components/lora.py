"""LoRA through peft: the base model's weights stay frozen, low-rank adapters on the chosen layers are
trained. Checkpoints hold only the adapters and what resume needs; `bigtrain export` writes the merged
model, or the adapter alone with --adapter."""

from omegaconf import DictConfig, OmegaConf

from bigtrain.errors import ConfigError

LORA_INSTALL_HINT = "pip install peft"


def enabled(model_cfg: DictConfig) -> bool:
    return model_cfg.lora.r > 0


def lora_config(model_cfg: DictConfig):
    from peft import LoraConfig

    targets = list(model_cfg.lora.target_modules)
    return LoraConfig(
        r=model_cfg.lora.r, lora_alpha=model_cfg.lora.alpha, lora_dropout=model_cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
    )


def wrap(model, model_cfg: DictConfig):
    """`model` with LoRA adapters (a peft PeftModel), or `model` itself when LoRA is off."""
    if not enabled(model_cfg):
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model_cfg))


def check_lora(cfg: DictConfig, model) -> None:
    """Refuse LoRA settings peft cannot apply, on a weightless copy of the model (meta device)."""
    lora = cfg.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}: r is 0 (off) or more, "
                          "alpha positive, dropout in [0, 1).")
    if not enabled(cfg.model):
        return
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"model.lora.r={lora.r} needs the peft package, which is not installed: {LORA_INSTALL_HINT}.")
    for key, value in (("parallel.pipeline", cfg.parallel.pipeline), ("parallel.tensor", cfg.parallel.tensor)):
        if value > 1:
            raise ConfigError(f"model.lora.r={lora.r} with {key}={value}: LoRA trains with data and sequence "
                              f"parallelism, at ZeRO 0-3 with or without offload. Use {key}=1.")
    try:
        from peft import get_peft_model

        get_peft_model(model, lora_config(cfg.model))
    except ValueError as err:
        raise ConfigError(
            f"model.lora.target_modules={OmegaConf.to_container(lora.target_modules)} does not fit model "
            f"{cfg.model.name} ({' '.join(str(err).split())[:300]}). Name its linear layers (e.g. q_proj, v_proj for "
            "Llama; c_attn for GPT-2), or all-linear."
        ) from None
