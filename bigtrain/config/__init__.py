"""Configuration: the typed schema, Hydra composition, validation, values derived from the config, and
the DeepSpeed config derived from it."""

from bigtrain.config.compose import compose

__all__ = ["compose"]
