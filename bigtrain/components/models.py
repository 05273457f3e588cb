"""Build Hugging Face causal-LM models from a `model` config: any `transformers` family or a local folder."""

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights

from bigtrain.errors import ConfigError


def build_model_config(model_cfg: DictConfig, special_tokens: dict[str, int] | None = None) -> PretrainedConfig:
    """The transformers config for `model_cfg`, reading only small JSON files (no code: a folder whose
    config points at code of its own is refused, never run).

    A model built from `hf_config` takes its special-token ids from `special_tokens` (the run's
    tokenizer, `special_token_ids`) unless hf_config sets them, so that training, export and plain
    `generate` agree on where text ends; a pretrained folder keeps its own."""
    if model_cfg.pretrained:
        folder = Path(model_cfg.pretrained)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={model_cfg.pretrained!r} is not a Hugging Face model folder "
                "(no config.json there). Point it at a folder written by save_pretrained() or "
                "`bigtrain export`."
            )
        return _loaded(lambda: AutoConfig.from_pretrained(folder, trust_remote_code=False),
                       f"model.pretrained={model_cfg.pretrained!r}")
    # Without the tokenizer's ids (a config read for its shapes only) none are set: the family's
    # defaults (GPT-2's 50256) may lie outside this vocabulary, which transformers warns about.
    tokens = special_tokens if special_tokens is not None else {"bos_token_id": None, "eos_token_id": None}
    kwargs = {**tokens, **OmegaConf.to_container(model_cfg.hf_config)}
    try:
        return AutoConfig.for_model(model_cfg.family, **kwargs)
    except ValueError as err:
        if model_cfg.family not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.family={model_cfg.family!r} is not a model type transformers knows ({err}). "
                "Use a Hugging Face model_type such as llama, gpt2, mistral or qwen2."
            ) from None
        raise _bad_hf_config(model_cfg, err) from None
    except Exception as err:  # noqa: BLE001 - transformers' config classes raise many kinds
        raise _bad_hf_config(model_cfg, err) from None


def _bad_hf_config(model_cfg: DictConfig, err: Exception) -> ConfigError:
    detail = " ".join(str(err).split())[:400]
    return ConfigError(
        f"model.hf_config does not make a valid {model_cfg.family} config: {type(err).__name__}: {detail}. "
        "Fix the value named there (each key is an argument of the transformers config class of "
        f"model.family={model_cfg.family})."
    )


def _loaded(load, what: str):
    """`load()` with transformers' failures (broken JSON, an unknown model type, code it would have to
    run) turned into one paragraph naming `what`."""
    from bigtrain.components.data.tokenizer import quiet_transformers

    try:
        with quiet_transformers():
            return load()
    except OSError as err:
        reason = f"it could not be read ({' '.join(str(err).split())[:300]})"
    except ValueError as err:
        text = " ".join(str(err).split())
        reason = (f"it asks for code of its own to be run (auto_map), which bigtrain never does ({text[:200]})"
                  if "trust_remote_code" in text else f"transformers cannot use it ({text[:300]})")
    except Exception as err:  # noqa: BLE001 - JSON errors and the like
        reason = f"it is damaged ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
    raise ConfigError(
        f"{what} cannot be loaded: {reason}. Point it at a folder written by save_pretrained() (or `bigtrain "
        "export`) for a model type transformers ships."
    )


@functools.lru_cache(maxsize=8)
def special_token_ids(tokenizer_path: str) -> dict[str, int]:
    """bos/eos/pad token ids of the tokenizer at `tokenizer_path` (the ones it has), for a model built
    from hf_config. A pad token is passed on only when it is a token of its own: the model's pad id is
    its embedding's padding_idx, a row that stays zero and never trains, which must not be the
    end-of-text token every document ends with."""
    from bigtrain.components.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ids.values():
        ids["pad_token_id"] = tokenizer.pad_token_id
    return {key: value for key, value in ids.items() if value is not None}


def check_model_config(model_cfg: DictConfig, config: PretrainedConfig) -> torch.nn.Module:
    """Refuse a config transformers accepts but cannot build a model from (zero layers, sizes that do
    not divide), by building it on the meta device: no memory, a fraction of a second. Returns that
    weightless model."""
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        value = getattr(config, key, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(
                f"Model {model_cfg.name} has {key}={value!r}; it must be a whole number of 1 or more. "
                f"Set model.hf_config.{key} to one."
            )
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - whatever the model class refuses
        raise _bad_hf_config(model_cfg, err) from None


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_model(model_cfg: DictConfig, seed: int, ds_config: dict | None = None,
                special_tokens: dict[str, int] | None = None) -> torch.nn.Module:
    """Instantiate the model in fp32 on the CPU; the DeepSpeed engine moves and casts it.

    Under ZeRO-3 (`ds_config` given with stage 3) the model is built already partitioned, through
    transformers' DeepSpeed integration (deepspeed.zero.Init): no rank ever holds the whole model, so
    a model larger than one rank's memory, offloaded to CPU or NVMe, can be built at all.

    A fresh model is initialised by transformers' own init, run once from `seed` after construction
    (torch's default init is skipped), with every random draw taken from the CPU generator: the
    same weights whether or not the model is partitioned (ZeRO-3 initialises gathered parameters on
    the GPU), on every rank and in a single-process reference.
    """
    config = build_model_config(model_cfg, special_tokens)
    attn = model_cfg.attn_implementation
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        _keep_zero3_config(ds_config)
    # Before a pretrained model is loaded too: what draws random numbers after it (LoRA's adapter init,
    # dropout) then depends on `seed` alone, not on what ran earlier in this process.
    torch.manual_seed(seed)
    if model_cfg.pretrained:
        return _loaded(lambda: AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained, dtype=torch.float32, attn_implementation=attn, trust_remote_code=False,
        ), f"model.pretrained={model_cfg.pretrained!r}")
    with random_init_on_cpu():
        if zero3:  # transformers skips torch's init and runs its own, gathered module by module
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        model.init_weights()
    return model


# transformers' random initialisers: it calls torch's through a table, swapped only while a model is built.
RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def random_init_on_cpu():
    """Make transformers' weight initialisers draw from the CPU generator whatever device a tensor is on:
    a tensor elsewhere is filled on the CPU and copied over, so that a model initialised on a GPU
    (ZeRO-3 gathers parameters there) gets exactly the weights the same seed gives on the CPU."""
    from transformers import initialization

    table = initialization.TORCH_INIT_FUNCTIONS
    saved = {name: table[name] for name in RANDOM_INITS if name in table}
    for name, init in saved.items():
        table[name] = _drawn_on_cpu(init)
    try:
        yield
    finally:
        table.update(saved)


def _drawn_on_cpu(init):
    def on_cpu(tensor: torch.Tensor, *args, **kwargs):
        if tensor.device.type == "cpu" or kwargs.get("generator") is not None:
            return init(tensor, *args, **kwargs)
        filled = init(torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu"), *args, **kwargs)
        with torch.no_grad():
            return tensor.copy_(filled)

    return on_cpu


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

