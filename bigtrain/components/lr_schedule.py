"""Learning-rate schedules, as a multiplier of optimizer.lr for each optimizer step:

- warmup_cosine: linear warm-up over scheduler.warmup_steps, then cosine decay to min_lr_ratio at
  train.max_steps;
- wsd (warmup-stable-decay): linear warm-up, the peak held, then a decay to min_lr_ratio over the last
  scheduler.decay_fraction of train.max_steps, linear or cosine (scheduler.decay_shape);
- constant: linear warm-up, then the peak.

DeepSpeed's WarmupCosineLR gives the first optimizer step a learning rate of 0 and refuses a warm-up of
0 steps, so bigtrain uses this small LambdaLR instead; the engine saves and restores it like its own.
"""

import math

import torch
from omegaconf import DictConfig


def lr_ratio(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """warmup_cosine's multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_ratio(step: int, warmup_steps: int, max_steps: int, min_ratio: float, decay_fraction: float,
              shape: str) -> float:
    """warmup-stable-decay's multiplier for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    fall = progress if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * fall


def schedule(cfg: DictConfig):
    """The multiplier function of cfg.scheduler for cfg.train.max_steps."""
    sched, max_steps = cfg.scheduler, cfg.train.max_steps
    if sched.name == "wsd":
        return lambda step: wsd_ratio(step, sched.warmup_steps, max_steps, sched.min_lr_ratio, sched.decay_fraction,
                                      sched.decay_shape)
    min_ratio = 1.0 if sched.name == "constant" else sched.min_lr_ratio
    return lambda step: lr_ratio(step, sched.warmup_steps, max_steps, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
