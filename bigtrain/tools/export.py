"""Export a checkpoint of a run as a plain Hugging Face model folder (config, safetensors, tokenizer)."""

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from bigtrain.components.checkpoint.store import checkpoint_dir, find_problem, newest_valid, read_latest, read_manifest
from bigtrain.components.checkpoint.universal import convert_to_universal
from bigtrain.components.data.tokenizer import load_tokenizer
from bigtrain.components.models import build_model_config, has_tied_output
from bigtrain.errors import CheckpointError, ConfigError

log = logging.getLogger("bigtrain")


def export(run_dir: str, out_dir: str, checkpoint: str | None = None) -> Path:
    """Write the weights of `checkpoint` (default: the run's newest valid one) to `out_dir`.

    Whatever the ZeRO stage, the fp32 master weights are gathered from the shards on disk; no
    process group or GPU is needed.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a bigtrain run dir (no config.yaml). Pass the run_dir of a run.")
    cfg = OmegaConf.load(run / "config.yaml")
    tag_dir = _pick_checkpoint(cfg, checkpoint)
    model = AutoModelForCausalLM.from_config(build_model_config(cfg.model), dtype=torch.float32)
    state_dict = fp32_state_dict(tag_dir, model)

    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {name for name in missing if has_tied_output(model) and name.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"The checkpoint {tag_dir} does not fit model {cfg.model.name}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(cfg.data.tokenizer).save_pretrained(out)
    log.info("exported %s (step %d) to %s", tag_dir, read_manifest(tag_dir)["step"], out)
    return out


def _pick_checkpoint(cfg, checkpoint: str | None) -> Path:
    if checkpoint:
        tag_dir = Path(checkpoint)
        problem = find_problem(tag_dir) if tag_dir.is_dir() else "not a folder"
        if problem:
            raise ConfigError(f"Cannot export {checkpoint}: {problem}.")
        return tag_dir
    ckpt_dir = checkpoint_dir(cfg)
    tag_dir, warnings = newest_valid(ckpt_dir, latest=read_latest(ckpt_dir))
    for warning in warnings:
        log.warning("%s; exporting an earlier checkpoint", warning)
    if tag_dir is None:
        raise ConfigError(f"No valid checkpoint in {ckpt_dir} to export.")
    return tag_dir


def fp32_state_dict(tag_dir: Path, model=None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint folder of any ZeRO stage or pipeline layout,
    named as in `model` (needed for pipeline checkpoints only; its own weights are not read)."""
    if any(tag_dir.glob("layer_*-model_states.pt")):
        # Pipeline stages save each layer's module weights in a file of its own. In fp32 these are the
        # master weights; a bf16 run's are its bf16 weights (the fp32 masters are not gathered).
        from bigtrain.distributed.pipeline import hf_state_dict_from_layers

        return hf_state_dict_from_layers(tag_dir, model)
    if read_manifest(tag_dir).get("tensor", 1) > 1:
        return _merged_tensor_parallel_state_dict(tag_dir)
    if not any(tag_dir.glob("*optim_states.pt")):
        # ZeRO-0 in fp32: the module's own weights are the master weights. (Mixed precision writes
        # its fp32 master copy to *optim_states.pt files even at stage 0, handled below.)
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)



def _merged_tensor_parallel_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Tensor-parallel ranks each save a slice of every sharded weight; DeepSpeed's universal
    conversion merges the slices (and the ZeRO shards) back into whole fp32 parameters."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bigtrain-export-") as tmp:
        out = Path(tmp) / tag_dir.name
        try:
            convert_to_universal(tag_dir, out)
        except CheckpointError as err:
            raise ConfigError(f"Cannot export {tag_dir}: {err}") from None
        return {
            param_dir.name: torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=False)["param"]
            for param_dir in sorted((out / "zero").iterdir())
            if (param_dir / "fp32.pt").is_file()
        }
