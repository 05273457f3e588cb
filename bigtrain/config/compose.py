"""Compose the run's config from conf/ and command-line overrides, with user-facing errors."""

import hashlib
import re
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigtrain.config.derived import default_tokenizer
from bigtrain.config.schema import register_schema
from bigtrain.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSET_DIR = PACKAGE_DIR / "assets"
# Keys of earlier releases, and what replaced them.
MOVED_KEYS = {
    "parallel.activation_checkpoint_interval": (
        "activation checkpointing works in every layout now, through one key. Use "
        "train.activation_checkpointing=full (every decoder layer), or none."
    ),
}
RUNS_DIR = "runs"


def _asset(path: str) -> str:
    return str(ASSET_DIR / path)


def _register() -> None:
    register_schema()
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with `overrides` (Hydra syntax) into a resolved, typed config."""
    _register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain_hydra_error(err, overrides)) from None
    except (ValueError, TypeError) as err:  # Hydra's own checks of a group override's value
        raise ConfigError(
            f"Could not compose the config from overrides {list(overrides)}: {err}. A config group takes an "
            "option name (model=tiny_gpt2), a key takes a value (train.max_steps=50)."
        ) from None
    if cfg.get("data") is not None and cfg.data.get("tokenizer", "") is None:
        cfg.data.tokenizer = default_tokenizer(cfg, _asset("tokenizer"))
    if cfg.get("run_dir") is None:
        cfg.run_dir = default_run_dir(overrides)
    elif not str(cfg.run_dir).strip():
        raise ConfigError(
            "run_dir is empty, which would make the current directory the run dir and scatter checkpoints, "
            "logs and metrics there. Give a folder (run_dir=runs/my-run), or leave run_dir unset for "
            "runs/<overrides>."
        )
    cfg.run_dir = str(Path(cfg.run_dir).absolute())
    return cfg


def default_run_dir(overrides: list[str]) -> str:
    """runs/<sorted overrides>: the same command always maps to the same folder, so every rank of a
    run agrees on it without talking, and relaunching a run finds its checkpoints."""
    name = ",".join(sorted(o for o in overrides if not o.startswith("run_dir="))) or "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
    if len(name) > 80:
        name = name[:70] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{RUNS_DIR}/{name}"


def _explain_hydra_error(err: Exception, overrides: list[str]) -> str:
    text = str(err).strip()
    cause = str(err.__cause__).strip().splitlines()[0] if err.__cause__ else ""
    missing_option = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        available = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        return (
            f"Unknown {group} option '{option}' (from '{group}={option}'). "
            f"Choose one of: {', '.join(available)}. Each option is a file in conf/{group}/."
        )
    unknown_key = re.search(r"Could not override '([^']+)'", text)
    if unknown_key and unknown_key.group(1) in MOVED_KEYS:
        return f"{unknown_key.group(1)} is gone: {MOVED_KEYS[unknown_key.group(1)]}"
    if unknown_key:
        return (
            f"Unknown config key '{unknown_key.group(1)}' ({cause}). Check its spelling against "
            "bigtrain/config/schema.py or the output of `bigtrain config`; only free-form dicts such "
            "as model.hf_config take new keys, with a leading '+' (+model.hf_config.rope_theta=1e4)."
        )
    bad_value = re.search(r"Error merging override (\S+)", text)
    if bad_value:
        return f"Bad value in override '{bad_value.group(1)}': {cause}. Give a value of the key's type."
    return f"Could not compose the config from overrides {list(overrides)}: {text} {cause}".strip()
