"""A single-process, plain-PyTorch training loop that parallel bigtrain runs are checked against.

It shares only the pieces under test's *inputs* with bigtrain (model construction from the config,
the data order, the schedule formula), and none of the engine: no DeepSpeed, no ZeRO, no all-reduce.
"""

import torch
from omegaconf import DictConfig

from bigtrain.components.data.loader import BatchPlan
from bigtrain.components.data.packed import build_packed_dataset
from bigtrain.components.lr_schedule import lr_ratio
from bigtrain.components.models import build_model


def reference_losses(cfg: DictConfig, dp_size: int, steps: int) -> list[float]:
    """Per-step mean loss of `steps` AdamW steps on the same global batches a `dp_size`-rank run sees."""
    return reference_run(cfg, dp_size, steps)[0]


def reference_run(cfg: DictConfig, dp_size: int, steps: int) -> tuple[list[float], torch.nn.Module]:
    """reference_losses, and the model as it is after those steps."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.seed)
    dataset = build_packed_dataset(cfg.data, cfg.train.seq_len)
    # One rank reading dp_size micro-batches at once reads the same blocks as dp_size ranks together.
    plan = BatchPlan(
        num_blocks=len(dataset),
        micro_batch_size=cfg.train.micro_batch_size * dp_size,
        grad_accum=cfg.train.grad_accum,
        dp_size=1,
        dp_rank=0,
        seed=cfg.seed,
    )
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        decay_groups(model, opt.weight_decay, exempt_defaults=list(opt.no_decay) == ["bias", "norm", "embed"]),
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
    )
    min_ratio = 1.0 if cfg.scheduler.name == "constant" else cfg.scheduler.min_lr_ratio
    losses = []
    for step in range(steps):
        ratio = lr_ratio(step, cfg.scheduler.warmup_steps, cfg.train.max_steps, min_ratio)
        for group in optimizer.param_groups:
            group["lr"] = opt.lr * ratio
        total = 0.0
        for micro in range(cfg.train.grad_accum):
            ids = dataset[plan.indices(step, micro)]["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss / cfg.train.grad_accum
            loss.backward()
            total += loss.item()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model


def decay_groups(model: torch.nn.Module, weight_decay: float, exempt_defaults: bool = True) -> list[dict]:
    """AdamW groups as the usual recipe has them: no weight decay for biases, norm weights and embedding
    tables (written out here, not taken from bigtrain); with exempt_defaults=False, decay for all."""
    exempt = set()
    if exempt_defaults:
        for module in model.modules():
            is_table = isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if is_table or name == "bias":
                    exempt.add(id(param))
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
