"""What a checkpoint and a run resuming from it must agree on: the shapes of the weights and the
tokenizer. Recorded in every manifest, so that `checkpoint.resume=auto` in a reused run dir cannot
silently continue a checkpoint of another model (dropout, learning rate, steps may change)."""

import hashlib
import json

from omegaconf import DictConfig

from bigtrain.errors import ConfigError


def run_fingerprint(cfg: DictConfig) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.components import lora
    from bigtrain.components.data.tokenizer import tokenizer_fingerprint
    from bigtrain.components.models import build_model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_model_config(cfg.model))
    model = lora.wrap(model, cfg.model)
    shapes = {name: list(param.shape) for name, param in model.named_parameters()}
    fingerprint = {
        "model": f"{cfg.model.name}:{_digest(shapes)}",
        "tokenizer": tokenizer_fingerprint(cfg.data.tokenizer),
    }
    if lora.enabled(cfg.model):  # its checkpoints leave the frozen base out: resume must rebuild the same one
        fingerprint["base"] = _base_identity(cfg)
    return fingerprint


def _base_identity(cfg: DictConfig) -> str:
    """The frozen weights a LoRA run starts from: a pretrained folder's weight files, or the seed of a fresh
    initialisation."""
    from pathlib import Path

    if not cfg.model.pretrained:
        return f"initialised from seed {cfg.seed}"
    files = sorted(Path(cfg.model.pretrained).glob("*.safetensors")) + sorted(Path(cfg.model.pretrained).glob("*.bin"))
    return _digest([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def check_fingerprint(saved: dict | None, current: dict[str, str], where: str) -> None:
    """Refuse to resume `where` (saved with fingerprint `saved`) into a run with fingerprint `current`.
    Checkpoints written before fingerprints existed carry none and are not checked."""
    if not saved:
        return
    differs = [key for key in current if key in saved and saved[key] != current[key]]
    if differs:
        what = "; ".join(f"{key}: saved {saved[key]}, this run {current[key]}" for key in differs)
        raise ConfigError(
            f"Checkpoint {where} was saved by a run of a different {' and '.join(differs)} ({what}); resuming "
            "from it would load weights that do not fit or continue another run. Give this run its own run_dir "
            "(or checkpoint.dir), or change the config back to the one that run used."
        )


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
