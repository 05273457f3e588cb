"""Tensor parallelism through DeepSpeed AutoTP: every linear layer of the model is sharded over the
ranks of a tensor group (attention by heads, the MLP by its inner width, each output gathered or
reduced where the next op needs it). DeepSpeed does the sharding inside deepspeed.initialize from
the `tensor_parallel` section of the config; bigtrain checks beforehand that the model can be split.
"""

from bigtrain.errors import ConfigError

# Families whose layers AutoTP recognises. GPT-2 is refused by AutoTP itself ("AutoTP not supported
# for model"): its fused Conv1D attention projection has no partition policy there.
UNSUPPORTED_FAMILIES = {"gpt2": "its fused Conv1D attention projection (c_attn) has no AutoTP partition policy"}


def check_tensor_parallel(model_config, name: str, tp: int) -> None:
    """Refuse a tensor degree the model cannot be sharded by."""
    family = model_config.model_type
    if family in UNSUPPORTED_FAMILIES:
        raise ConfigError(
            f"parallel.tensor={tp}: DeepSpeed's AutoTP cannot shard model family {family!r} "
            f"({UNSUPPORTED_FAMILIES[family]}). For {name}, use parallel.pipeline={tp} (pipeline stages) "
            "or zero=stage3 (sharded parameters) with parallel.tensor=1."
        )
    sizes = {
        "num_attention_heads": model_config.num_attention_heads,
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None),
        "hidden_size": model_config.hidden_size,
        "intermediate_size": getattr(model_config, "intermediate_size", None),
    }
    for key, value in sizes.items():
        if value is not None and value % tp:
            raise ConfigError(
                f"parallel.tensor={tp} must divide the model's {key}, but model {name} has "
                f"{key}={value}. Pick a tensor degree that divides it (e.g. parallel.tensor="
                f"{_largest_divisor(value, tp)}), or scale with data parallelism instead."
            )


def _largest_divisor(value: int, below: int) -> int:
    return max(d for d in range(1, below + 1) if value % d == 0)


def tensor_parallel_section(tp: int) -> dict:
    """The DeepSpeed config section that makes deepspeed.initialize shard the model."""
    return {"autotp_size": tp}
