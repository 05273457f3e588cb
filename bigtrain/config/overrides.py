"""Write a config as Hydra overrides, so that ranks launched as separate processes compose exactly
the config a Python caller built (an edited DictConfig, a Hugging Face model config)."""

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bigtrain.config.compose import compose
from bigtrain.errors import ConfigError


def config_to_overrides(overrides: list[str], target: DictConfig) -> list[str]:
    """`overrides` plus what turns their composition into `target`: one override per leaf that
    differs, `~key` for a key the target dropped from a free-form dict. Checked by composing it."""
    base = OmegaConf.to_container(compose(overrides), resolve=True)
    wanted = OmegaConf.to_container(target, resolve=True)
    result = [*overrides, *_diff(base, wanted, "")]
    if not any(o.startswith("run_dir=") for o in result):  # the default run dir is named after the overrides
        result.append(f"run_dir={format_value(wanted['run_dir'])}")
    if OmegaConf.to_container(compose(result), resolve=True) != wanted:
        raise ConfigError(
            "This config cannot be passed to launched ranks as overrides (composing them gave a different "
            "config). Give the changes as overrides instead, e.g. train(['train.max_steps=50'], nproc=2)."
        )
    return result


def _diff(base: Any, target: Any, key: str) -> list[str]:
    if isinstance(base, dict) and isinstance(target, dict):
        dropped = [f"~{key}.{k}" if key else f"~{k}" for k in base if k not in target]
        changed = [o for k in target for o in _diff(base.get(k, _MISSING), target[k], f"{key}.{k}" if key else k)]
        return dropped + changed
    if base is _MISSING:
        return [f"++{key}={format_value(target)}"]
    return [] if base == target else [f"{key}={format_value(target)}"]


_MISSING = object()


def format_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_key(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"Cannot pass {value!r} ({type(value).__name__}) to launched ranks as a config value; "
                      "use numbers, strings, booleans, lists or dicts of those.")


def _key(key: Any) -> str:
    key = str(key)
    if not key.replace("_", "a").isalnum():
        raise ConfigError(f"Config key {key!r} cannot be written as a Hydra override; use letters, digits and _.")
    return key


# Multi-node launches pass the overrides to every rank in this environment variable (launchers/multinode.sh):
# a remote shell never sees them, so every rank composes exactly the bytes the launch check composed.
OVERRIDES_ENV = "BIGTRAIN_OVERRIDES"


def encode_overrides(overrides: list[str]) -> str:
    """`overrides` as base64 of a JSON list: only letters, digits, + / and =, which no shell alters."""
    import base64
    import json

    return base64.b64encode(json.dumps(list(overrides)).encode()).decode()


def decode_overrides(encoded: str) -> list[str]:
    import base64
    import json

    try:
        overrides = json.loads(base64.b64decode(encoded.strip(), validate=True))
    except ValueError:
        overrides = None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{OVERRIDES_ENV} does not hold overrides encoded by launchers/multinode.sh; unset it, "
                          "or launch through that script.")
    return overrides


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--encode"]:
        sys.exit("usage: python -m bigtrain.config.overrides --encode [OVERRIDES...]")
    print(encode_overrides(sys.argv[2:]))
