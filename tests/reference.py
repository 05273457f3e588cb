"""A single-process, plain-PyTorch training loop that parallel bigtrain runs are checked against.

It shares only the pieces under test's *inputs* with bigtrain (model construction from the config,
the prepared data and its order, the schedule formula), and none of the engine: no DeepSpeed, no ZeRO,
no all-reduce. Its loss is written out here: the sum of the step's token losses over its token count.
"""

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bigtrain.components.data.loader import BatchLoader, BatchPlan
from bigtrain.components.data.prepared import IGNORE
from bigtrain.components.data.sources import ensure_prepared, open_samples, training_sources
from bigtrain.components.lr_schedule import lr_ratio
from bigtrain.components.models import build_model, special_token_ids


def reference_losses(cfg: DictConfig, dp_size: int, steps: int) -> list[float]:
    """Per-step mean loss of `steps` AdamW steps on the same global batches a `dp_size`-rank run sees."""
    return reference_run(cfg, dp_size, steps)[0]


def reference_loader(cfg: DictConfig, dp_size: int) -> BatchLoader:
    """One rank reading dp_size micro-batches at once reads the same samples as dp_size ranks together."""
    ensure_prepared(cfg)
    sources = training_sources(cfg)
    plan = BatchPlan(micro_batch_size=cfg.train.micro_batch_size * dp_size, grad_accum=cfg.train.grad_accum,
                     dp_size=1, dp_rank=0)
    return BatchLoader(open_samples(cfg, sources, "train"), [s.weight for s in sources], plan, cfg.seed)


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of the next-token losses, their count) of a batch."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def reference_run(cfg: DictConfig, dp_size: int, steps: int) -> tuple[list[float], torch.nn.Module]:
    """reference_losses, and the model as it is after those steps."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer))
    loader = reference_loader(cfg, dp_size)
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
        batches = [loader.micro_batch(step, micro) for micro in range(cfg.train.grad_accum)]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss = token_loss_sum(model, batch)[0] / tokens
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
