"""Wrap a model in a DeepSpeed engine built from the derived config: a PipelineEngine over the
model's stages when parallel.pipeline > 1; DeepSpeed shards it for tensor parallelism itself."""

import deepspeed
from omegaconf import DictConfig

from bigtrain.components.lr_schedule import build_scheduler
from bigtrain.components.optimizer import parameter_groups


def build_engine(model, ds_config: dict, cfg: DictConfig, mpu=None):
    """`mpu`: the model-parallel unit DeepSpeed builds its groups from (Ulysses' sequence groups)."""
    if cfg.parallel.pipeline > 1:
        from bigtrain.distributed.pipeline import build_pipeline_module

        model = build_pipeline_module(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.no_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg),
        mpu=mpu,
    )
    return engine
