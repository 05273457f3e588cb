"""Export a checkpoint of a run as a plain Hugging Face model folder (config, safetensors, tokenizer).

The run is read from the RUN_DIR given (a copied or moved run exports its own weights), the folder is
written under a temporary name and renamed when complete, and an existing OUT that is not empty is
left alone unless the user asks for it to be replaced.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from bigtrain.components.checkpoint.safe_load import check_folder, safe_load, weights_only_loads
from bigtrain.components.checkpoint.store import find_problem, newest_valid, read_latest, read_manifest
from bigtrain.components.checkpoint.universal import convert_to_universal
from bigtrain.components.data.tokenizer import load_tokenizer
from bigtrain.components.files import replace_folder, staging_dir
from bigtrain.components.models import build_model_config, has_tied_output, special_token_ids
from bigtrain.errors import CheckpointError, ConfigError

log = logging.getLogger("bigtrain")


def load_run_config(run_dir: str) -> DictConfig:
    """The config.yaml of the run in `run_dir`, refused with one paragraph if it is not a readable one."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a bigtrain run dir (no config.yaml). Pass the run_dir of a run.")
    try:
        cfg = OmegaConf.load(path)
        cfg.model.name, cfg.checkpoint.dir, cfg.data.tokenizer  # noqa: B018 - the keys this needs exist
    except Exception as err:  # noqa: BLE001 - YAML errors, a file of another kind
        raise ConfigError(
            f"{path} is not a readable bigtrain config ({type(err).__name__}: {' '.join(str(err).split())[:200]}). "
            "It is written by every run; restore it from the run's own copy or pass another run dir."
        ) from None
    return cfg


def run_checkpoint_dir(run_dir: str, cfg: DictConfig) -> Path:
    """The run's checkpoint folder, found from `run_dir` as given: a relative checkpoint.dir lies under
    it wherever the run has been copied or moved (config.yaml still names where it was trained)."""
    path = Path(cfg.checkpoint.dir)
    return path if path.is_absolute() else Path(run_dir) / path


def export(run_dir: str, out_dir: str, checkpoint: str | None = None, overwrite: bool = False,
           adapter: bool = False) -> Path:
    """Write the weights of `checkpoint` (default: the run's newest valid one) to `out_dir`.

    Whatever the ZeRO stage, the fp32 master weights are gathered from the shards on disk; no
    process group or GPU is needed. A LoRA run exports the base model with its adapters merged in, or
    with `adapter` the peft adapter alone.
    """
    from bigtrain.components import lora

    cfg = load_run_config(run_dir)
    out = _check_out(Path(out_dir), overwrite)
    if adapter and not lora.enabled(cfg.model):
        raise ConfigError(f"--adapter exports LoRA adapters, and the run in {run_dir} trained every weight "
                          "(model.lora.r=0). Export without --adapter.")
    tag_dir = _pick_checkpoint(run_checkpoint_dir(run_dir, cfg), checkpoint)
    check_folder(tag_dir)  # a file that would run code refuses the whole checkpoint, read or not
    model = _trained_model(cfg, tag_dir)
    if lora.enabled(cfg.model) and not adapter:
        model = model.merge_and_unload()
    staging = staging_dir(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(cfg.data.tokenizer).save_pretrained(staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s", tag_dir, read_manifest(tag_dir)["step"], out)
    return out


def _trained_model(cfg: DictConfig, tag_dir: Path):
    """The model with the checkpoint's weights: the whole model, or a LoRA run's frozen base (rebuilt as the
    run built it) wrapped with its trained adapters."""
    from bigtrain.components import lora

    if lora.enabled(cfg.model):
        from bigtrain.components.models import build_model

        model = lora.wrap(build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer)),
                          cfg.model)
    else:
        config = build_model_config(cfg.model, special_token_ids(cfg.data.tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state_dict = fp32_state_dict(tag_dir, model, cfg.optimizer.get("no_decay", []))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if lora.enabled(cfg.model):  # the checkpoint holds the adapters only; the base is already in place
        missing = [name for name in missing if "lora_" in name]
    tied = {name for name in missing if has_tied_output(model) and name.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"The checkpoint {tag_dir} does not fit model {cfg.model.name}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    return model


def _check_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; an export writes a model folder. Pass a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out} already holds files, which an export would replace or leave stale (an old weight shard, an "
            "index). Pass an empty or new folder, or --overwrite to replace that folder with the export."
        )
    return out


def _pick_checkpoint(ckpt_dir: Path, checkpoint: str | None) -> Path:
    if checkpoint:
        tag_dir = Path(checkpoint)
        problem = find_problem(tag_dir) if tag_dir.is_dir() else "not a folder"
        if problem:
            raise ConfigError(f"Cannot export {checkpoint}: {problem}.")
        return tag_dir
    tag_dir, warnings = newest_valid(ckpt_dir, latest=read_latest(ckpt_dir))
    for warning in warnings:
        log.warning("%s; exporting an earlier checkpoint", warning)
    if tag_dir is None:
        raise ConfigError(f"No valid checkpoint in {ckpt_dir} to export.")
    return tag_dir


def fp32_state_dict(tag_dir: Path, model=None, no_decay=()) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint folder of any ZeRO stage or pipeline layout,
    named as in `model` (needed for pipeline and fp16 ZeRO-0 checkpoints; its own weights are not
    read). Every file is read with the weights-only unpickler."""
    if any(tag_dir.glob("layer_*-model_states.pt")):
        # Pipeline stages save each layer's module weights in a file of its own. In fp32 these are the
        # master weights; a bf16 run's are its bf16 weights (the fp32 masters are not gathered).
        from bigtrain.distributed.pipeline import hf_state_dict_from_layers

        return hf_state_dict_from_layers(tag_dir, model)
    if read_manifest(tag_dir).get("tensor", 1) > 1:
        return _merged_tensor_parallel_state_dict(tag_dir)
    if not any(tag_dir.glob("*optim_states.pt")):
        # ZeRO-0: fp32 training's module weights are its master weights; fp16's fp32 masters are in the
        # model-states file, one flat tensor per parameter group from DeepSpeed's FP16_Optimizer (with its
        # FusedAdam), one tensor per parameter from FP16_UnfusedOptimizer (with torch's AdamW, bigtrain's
        # default). (bf16 writes its fp32 copy to *optim_states.pt files even at stage 0, read below.)
        states = safe_load(tag_dir / "mp_rank_00_model_states.pt")
        optimizer = states.get("optimizer") or {}
        masters = optimizer.get("fp32_groups_flat")
        if masters is None and optimizer.get("fp32_groups") is not None:
            masters = [torch.cat([t.reshape(-1) for t in group]) for group in optimizer["fp32_groups"]]
        if masters is not None:
            return unflatten_fp16_masters(masters, model, states["module"], no_decay)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(tag_dir):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def unflatten_fp16_masters(flat_groups: list[torch.Tensor], model, module_state: dict,
                           no_decay=()) -> dict[str, torch.Tensor]:
    """The fp32 master weights of an fp16 ZeRO-0 checkpoint, given as one flat tensor per parameter group
    (as DeepSpeed's FP16_Optimizer holds them): the trainable parameters back to back in the order
    bigtrain handed them to the engine (the model's parameter order, group by group)."""
    from bigtrain.components.optimizer import parameter_groups

    state = {k: v.float() for k, v in module_state.items()}
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [group["params"] for group in parameter_groups(model, 0.0, no_decay)]
    if len(groups) != len(flat_groups):
        raise ConfigError(f"The fp16 checkpoint has {len(flat_groups)} flat master-weight groups where the model "
                          f"has {len(groups)} parameter groups: it was not written for this model.")
    for params, flat in zip(groups, flat_groups):
        if sum(p.numel() for p in params) != flat.numel():
            raise ConfigError("The fp16 checkpoint's master weights do not match the model's parameter sizes.")
        offset = 0
        for param in params:
            state[names[id(param)]] = flat[offset: offset + param.numel()].view(param.shape).float().clone()
            offset += param.numel()
    return state


def _merged_tensor_parallel_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Tensor-parallel ranks each save a slice of every sharded weight; DeepSpeed's universal
    conversion merges the slices (and the ZeRO shards) back into whole fp32 parameters."""
    with tempfile.TemporaryDirectory(prefix="bigtrain-export-") as tmp:
        out = Path(tmp) / tag_dir.name
        try:
            convert_to_universal(tag_dir, out)
        except CheckpointError as err:
            raise ConfigError(f"Cannot export {tag_dir}: {err}") from None
        return {
            param_dir.name: safe_load(param_dir / "fp32.pt")["param"]
            for param_dir in sorted((out / "zero").iterdir())
            if (param_dir / "fp32.pt").is_file()
        }
