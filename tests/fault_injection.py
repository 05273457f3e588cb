"""A test-only launcher: bigtrain's entry point with faults injected through the product's seams
(`Trainer.forward`, `Checkpointer.save`), never through the user's config.

    torchrun --nproc_per_node 2 tests/fault_injection.py [--nan-steps 3,4] [--slow-rank 1 --slow-step-s 0.5]
        [--slow-save-s 12] OVERRIDES...

--nan-steps S,...   rank 0's loss is NaN in every micro-batch of these (1-based) steps
--slow-rank R       this rank sleeps --slow-step-s seconds before each micro-batch's forward
--slow-save-s T     rank 0 sleeps T seconds inside every checkpoint save
"""

import argparse
import contextlib
import sys
import time

import torch.distributed as dist

from bigtrain.components.checkpoint.checkpointer import Checkpointer
from bigtrain.runtime.trainer import Trainer
from bigtrain.train import main


@contextlib.contextmanager
def injected(nan_steps=(), slow_rank: int = -1, slow_step_s: float = 0.0, slow_save_s: float = 0.0):
    """The faults for the runs started inside the block (in this process: the rank pool's workers)."""
    forward, save = Trainer.forward, Checkpointer.save
    inject(set(nan_steps), slow_rank, slow_step_s, slow_save_s)
    try:
        yield
    finally:
        Trainer.forward, Checkpointer.save = forward, save


def train_with_faults(faults: dict, overrides: list[str]):
    """On every rank of the pool: a run of `overrides` with `faults` (keyword arguments of `injected`)."""
    from conftest import pool_train

    with injected(**faults):
        return pool_train(overrides)


def inject(nan_steps: set[int], slow_rank: int, slow_step_s: float, slow_save_s: float) -> None:
    forward, save = Trainer.forward, Checkpointer.save

    def faulty_forward(self, step, batch, tokens):
        if dist.get_rank() == slow_rank:
            time.sleep(slow_step_s)
        loss = forward(self, step, batch, tokens)
        if step + 1 in nan_steps and dist.get_rank() == 0:
            loss = loss * float("nan")
        return loss

    def slow_save(self, *args, **kwargs):
        if dist.get_rank() == 0:
            time.sleep(slow_save_s)
        return save(self, *args, **kwargs)

    Trainer.forward = faulty_forward
    if slow_save_s:
        Checkpointer.save = slow_save


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-steps", default="", type=lambda text: {int(s) for s in text.split(",") if s})
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-step-s", type=float, default=0.0)
    parser.add_argument("--slow-save-s", type=float, default=0.0)
    faults, overrides = parser.parse_known_args()
    inject(faults.nan_steps, faults.slow_rank, faults.slow_step_s, faults.slow_save_s)
    sys.exit(main(overrides))
