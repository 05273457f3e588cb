"""Configuration: compose (Hydra), validate, and derive the DeepSpeed config."""

from bigtrain.config.compose import compose
from bigtrain.config.errors import ConfigError

__all__ = ["compose", "ConfigError"]
