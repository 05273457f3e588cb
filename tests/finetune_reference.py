"""Plain-PyTorch references for the fine-tuning tests (tests/test_finetune.py).

- reference_steps: a single-process training loop like tests/reference.py's, whose loss is the sum of
  the global batch's token losses over its count of trained-on tokens, written out here; it also
  records each step's gradient norm, and takes its learning-rate multiplier as a function, so a
  schedule written out in the test drives it.
- wsd_multiplier: the warmup-stable-decay schedule from its documented definition (conf/scheduler/
  wsd.yaml, SchedulerConfig), written without bigtrain's code.
"""

import math

import torch
from omegaconf import DictConfig
from reference import decay_groups, reference_loader, token_loss_sum

from bigtrain.components.data.prepared import IGNORE
from bigtrain.components.models import build_model, special_token_ids


def wsd_multiplier(step: int, warmup: int, total: int, min_ratio: float, fraction: float, shape: str) -> float:
    """Learning rate over the peak at optimizer step `step` (0-based) of `total`.

    Warm-up: the first `warmup` steps climb linearly, step s at (s + 1) / warmup, so the last warm-up
    step is at the peak. Decay: the last round(fraction * total) steps (never reaching into the
    warm-up) fall from the peak to min_ratio, the k-th of D at a fall of k / D, linear, or
    (1 - cos(pi k / D)) / 2, cosine, so the last step of the run is at min_ratio. Between them the
    peak is held."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = min(round(fraction * total), total - warmup)
    k = step - (total - decay_steps) + 1  # 1 on the first decay step, decay_steps on the last
    if k <= 0:
        return 1.0
    fall = k / decay_steps if shape == "linear" else (1 - math.cos(math.pi * k / decay_steps)) / 2
    return 1.0 - (1.0 - min_ratio) * fall


def reference_steps(cfg: DictConfig, dp_size: int, steps: int, multiplier) -> tuple[list[float], list[float]]:
    """(loss, gradient norm before clipping) of each of `steps` AdamW steps on the global batches a
    `dp_size`-rank run of `cfg` reads; the learning rate of step s is optimizer.lr * multiplier(s)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer))
    loader = reference_loader(cfg, dp_size)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(decay_groups(model, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas),
                                  eps=opt.eps)
    losses, norms = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = opt.lr * multiplier(step)
        batches = [loader.micro_batch(step, micro) for micro in range(cfg.train.grad_accum)]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss = token_loss_sum(model, batch)[0] / tokens
            loss.backward()
            total += loss.item()
        norm = gradient_norm(model)
        if opt.grad_clip > 0 and norm > opt.grad_clip:
            for param in model.parameters():
                param.grad.mul_(opt.grad_clip / (norm + 1e-6))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(norm)
    return losses, norms


def gradient_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all gradients, summed in float64: torch's fp32 norm kernel on the CPU sums a
    1M-element tensor (an embedding's gradient) with a relative error of about 1e-5, which would be
    the largest difference in the comparison."""
    return math.sqrt(sum(float(param.grad.double().pow(2).sum()) for param in model.parameters()))
