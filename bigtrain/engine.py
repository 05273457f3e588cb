"""Wrap a model in a DeepSpeed engine built from the derived config."""

import deepspeed
from omegaconf import DictConfig

from bigtrain.schedule import build_scheduler


def build_engine(model, ds_config: dict, cfg: DictConfig):
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg),
    )
    return engine
