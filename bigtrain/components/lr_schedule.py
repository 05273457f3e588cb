"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

DeepSpeed's WarmupCosineLR gives the first optimizer step a learning rate of 0 and refuses a warm-up of
0 steps, so bigtrain uses this small LambdaLR instead; the engine saves and restores it like its own.
"""

import math

import torch
from omegaconf import DictConfig


def lr_ratio(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    sched = cfg.scheduler
    min_ratio = 1.0 if sched.name == "constant" else sched.min_lr_ratio
    warmup, max_steps = sched.warmup_steps, cfg.train.max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_ratio(step, warmup, max_steps, min_ratio)
    )
