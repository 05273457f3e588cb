"""The optimizer's parameter groups: weight decay for the weight matrices, none for biases, norms and
embeddings (as Megatron, nanoGPT and the HF Trainer do), by `optimizer.no_decay`."""

import re

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float, no_decay: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """The trainable parameters of `model` in at most two groups, decayed and not, each in the model's
    parameter order. A parameter goes without decay when a `no_decay` pattern (a regular expression,
    case-insensitive) matches its name or the class name of the module holding it: the defaults
    bias, norm and embed catch `*.bias`, every *Norm module's weight and every Embedding table (a
    head tied to the embedding is that same table)."""
    patterns = [re.compile(p, re.IGNORECASE) for p in no_decay]
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), type(module).__name__)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = any(p.search(name) or p.search(owners.get(id(param), "")) for p in patterns)
        (plain if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
