"""Derive the DeepSpeed config from the bigtrain config: the only place DeepSpeed JSON is made.

The learning-rate schedule is not in it: bigtrain passes its own (bigtrain/schedule.py) to the engine,
which checkpoints it like its own.
"""

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bigtrain.config.derived import resolve_device
from bigtrain.config.options import REDUCED_PRECISION_COMM, ZEROPP_COMM
from bigtrain.distributed.tensor import tensor_parallel_section
from bigtrain.distributed.topology import ProcessGrid


def to_deepspeed_config(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `world_size` processes."""
    train = cfg.train
    dp = ProcessGrid.of(cfg, world_size).data
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        # DeepSpeed checks this against the data-parallel size it knows when it reads the config:
        # the pipeline grid's data axis, but under AutoTP every rank (its groups come later).
        "train_batch_size": train.micro_batch_size * train.grad_accum * dp * cfg.parallel.tensor,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": _zero(cfg, world_size),
        "optimizer": _optimizer(cfg),
        "bf16": {"enabled": cfg.precision.name == "bf16"},
        "fp16": {"enabled": cfg.precision.name == "fp16", "initial_scale_power": 16},
        # bigtrain prints its own step lines; DeepSpeed's would repeat them from every rank.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.tensor > 1:
        ds["tensor_parallel"] = tensor_parallel_section(cfg.parallel.tensor)
    if cfg.parallel.sequence > 1:
        # Ulysses: the engine counts data ranks from the sequence groups it is given, differently at ZeRO-3
        # (measured: it checks against every rank there); it derives the global batch itself.
        del ds["train_batch_size"]
    ds.update(_comm(cfg))
    if cfg.logging.tensorboard:
        ds["tensorboard"] = {
            "enabled": True,
            "output_path": str(Path(cfg.run_dir) / "tensorboard"),
            "job_name": "train",
        }
    ds.update(_monitors(cfg))
    return _merge(ds, OmegaConf.to_container(cfg.deepspeed))


def _monitors(cfg: DictConfig) -> dict[str, Any]:
    """DeepSpeed's other sinks for the metrics bigtrain writes through the engine's monitor (W&B is
    bigtrain's own: bigtrain/monitor/sinks.py), and its flops profiler (whose profile_step counts completed optimizer steps, so step N is N - 1)."""
    logging, run_dir = cfg.logging, Path(cfg.run_dir)
    sections: dict[str, Any] = {}
    if logging.csv:
        sections["csv_monitor"] = {"enabled": True, "output_path": str(run_dir / "csv"), "job_name": "train"}
    if logging.flops_profile_step > 0:
        sections["flops_profiler"] = {
            "enabled": True,
            "profile_step": logging.flops_profile_step - 1,
            "module_depth": -1,
            "top_modules": 3,
            "detailed": False,
            "output_file": str(run_dir / "flops_profile.txt"),
        }
    return sections


def _zero(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    zero, offload = cfg.zero, cfg.offload
    section: dict[str, Any] = {"stage": zero.stage}
    if zero.stage == 0:
        return section
    section.update(
        overlap_comm=zero.overlap_comm,
        contiguous_gradients=zero.contiguous_gradients,
        reduce_bucket_size=zero.reduce_bucket_size,
        allgather_bucket_size=zero.allgather_bucket_size,
    )
    if offload.optimizer != "none":
        section["offload_optimizer"] = _offload_target(offload.optimizer, cfg)
    if offload.param != "none":
        section["offload_param"] = _offload_target(offload.param, cfg)
        if offload.param == "nvme":
            section.update(_nvme_parameters(cfg, ProcessGrid.of(cfg, world_size).data))
    if offload.sub_group_size is not None:
        section["sub_group_size"] = offload.sub_group_size
    if cfg.comm.name in ZEROPP_COMM:
        section.update(_zeropp(cfg.comm, world_size))
    return section


def _nvme_parameters(cfg: DictConfig, dp: int) -> dict[str, Any]:
    """ZeRO-3 settings for parameters read from NVMe as each module needs them."""
    from bigtrain.components.models import model_shape

    largest_partition = -(-model_shape(cfg.model).largest_parameter // dp)
    offload_param: dict[str, Any] = {
        "device": "nvme", "nvme_path": cfg.offload.nvme_path, "pin_memory": pin_memory(cfg),
        # Each buffer of the pool holds one rank's partition of one parameter: sized to the largest
        # (DeepSpeed's 1e8 elements is too small for a 128k-vocabulary embedding and, for most
        # models, several times too big). 5 buffers ran dry in the first step here; 10 did not.
        "buffer_size": largest_partition,
        "buffer_count": 10,
    }
    if cfg.offload.max_in_cpu is not None:
        offload_param["max_in_cpu"] = cfg.offload.max_in_cpu
    return {
        "offload_param": offload_param,
        # A gathered parameter must go back to disk as soon as its module is done: with DeepSpeed's
        # defaults (prefetching, keeping soon-reused parameters live) the buffer pool runs dry,
        # "Not enough buffers 0 for swapping 1" (DeepSpeed issue #3062; measured at step 2).
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
    }


def _zeropp(comm: DictConfig, world_size: int) -> dict[str, Any]:
    hpz = comm.hpz_partition_size
    if hpz == 0:  # the ranks of one node, as the launcher counts them; one node without a launcher
        hpz = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
    return {
        "zero_quantized_weights": comm.quantized_weights,
        "zero_quantized_gradients": comm.quantized_gradients,
        "zero_hpz_partition_size": hpz,
    }


def _comm(cfg: DictConfig) -> dict[str, Any]:
    """Top-level keys for the gradient exchange. bigtrain's own exchanges (onebit, powersgd,
    local_sgd) need none: they run at ZeRO-0 with the engine's all-reduce switched off."""
    section: dict[str, Any] = {}
    if cfg.comm.count_bytes:
        # The key's presence is what turns DeepSpeed's logger on; prof_all records every collective.
        section["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    if cfg.comm.name in REDUCED_PRECISION_COMM:
        section["communication_data_type"] = REDUCED_PRECISION_COMM[cfg.comm.name]
    return section


def pin_memory(cfg: DictConfig) -> bool:
    """offload.pin_memory, by default on where there is a GPU to copy to (page-locked buffers make the
    host-device copies of offloaded states faster) and off on the CPU, where there is nothing to gain."""
    if cfg.offload.pin_memory is not None:
        return cfg.offload.pin_memory
    return resolve_device(cfg) == "cuda"


def _offload_target(device: str, cfg: DictConfig) -> dict[str, Any]:
    offload = cfg.offload
    target: dict[str, Any] = {"device": device, "pin_memory": pin_memory(cfg)}
    if device == "nvme":
        target["nvme_path"] = offload.nvme_path
    return target


def _optimizer(cfg: DictConfig) -> dict[str, Any]:
    opt = cfg.optimizer
    params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
        # DeepSpeed's Adam applies decoupled (AdamW) weight decay unless told otherwise.
        "adam_w_mode": opt.name == "adamw",
    }
    if cfg.offload.optimizer == "none":
        # torch's fused AdamW, which ships in the torch wheel for the CPU and for CUDA: DeepSpeed's
        # FusedAdam would JIT-build an op, from CUDA sources on a GPU (needing nvcc, which a plain torch
        # install does not bring). On the CPU torch's default (per-tensor loop) AdamW took 84 ms per step
        # on 17M parameters where the fused one took 23 ms (1 core). With optimizer offload DeepSpeed
        # steps on the CPU with its DeepSpeedCPUAdam.
        params["torch_adam"] = True
        params["fused"] = True
    return {"type": "AdamW" if opt.name == "adamw" else "Adam", "params": params}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base
