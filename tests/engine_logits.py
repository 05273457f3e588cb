"""Logits of a run's checkpoint computed by a real DeepSpeed engine: on the rank pool
(`pool.run(engine_logits, run_dir)`), or under a launcher:

    torchrun --nproc_per_node N tests/engine_logits.py RUN_DIR OUT.pt
"""

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bigtrain.components.checkpoint.checkpointer import Checkpointer
from bigtrain.components.models import build_model
from bigtrain.config.deepspeed import to_deepspeed_config
from bigtrain.distributed.process_group import init_distributed, ranks_from_env, select_accelerator
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.runtime.engine import build_engine


def fixed_batch(vocab_size: int) -> torch.Tensor:
    return (torch.arange(2 * 24).reshape(2, 24) * 37) % vocab_size


def engine_logits(run_dir: str) -> torch.Tensor | None:
    """On every rank of a joined process group: the logits of the run's latest checkpoint on the
    fixed batch; rank 0 returns them, the others None."""
    from bigtrain.runtime.run import _forget_process_state, _remember_deepspeed_groups

    _remember_deepspeed_groups()
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    ranks = ranks_from_env()
    try:
        engine = build_engine(build_model(cfg.model, seed=0), to_deepspeed_config(cfg, ranks.world_size), cfg)
        checkpointer = Checkpointer(cfg, ranks.rank, ProcessGrid.of(cfg, ranks.world_size))
        checkpointer.attach(engine)
        checkpointer.load(checkpointer.find_resume_point())
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=fixed_batch(engine.module.config.vocab_size)).logits
        engine.destroy()
    finally:
        _forget_process_state()  # the next run in this process starts from a clean slate
    return logits if ranks.is_main else None


def main(run_dir: str, out: str) -> None:
    select_accelerator("cpu")
    init_distributed(120)
    logits = engine_logits(run_dir)
    if logits is not None:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
