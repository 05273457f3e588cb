"""Local SGD: every rank takes optimizer steps on its own gradients and the replicas are averaged
every `sync_every` steps (and at the last step). With an outer optimizer it is DiLoCo (Douillard et
al., 2023): the average change since the last sync is treated as a gradient of the weights held
then, and SGD with Nesterov momentum takes the step. Optimizer states stay local, as in both."""

import torch
from deepspeed import comm as dist


class LocalSGD:
    def __init__(self, params: list[torch.nn.Parameter], sync_every: int, max_steps: int, world_size: int,
                 outer_optimizer: str, outer_lr: float, outer_momentum: float):
        self.params = params
        self.sync_every = sync_every
        self.max_steps = max_steps
        self.world_size = world_size
        self.outer_optimizer, self.outer_lr, self.outer_momentum = outer_optimizer, outer_lr, outer_momentum
        self.anchor: list[torch.Tensor] | None = None  # the weights at the last sync (outer optimizer)
        self.outer = None

    def reduce(self, grads: list[torch.Tensor]) -> None:
        """Nothing to exchange: each replica steps on its own gradient. The weights before the first
        local step are the outer optimizer's starting point."""
        if self.anchor is None and self.outer_optimizer == "nesterov":
            self.anchor = [p.detach().clone() for p in self.params]
            self.outer = torch.optim.SGD(self.anchor, lr=self.outer_lr, momentum=self.outer_momentum,
                                         nesterov=self.outer_momentum > 0)

    def after_step(self, step: int) -> None:
        completed = step + 1
        if completed % self.sync_every and completed != self.max_steps:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        averaged = _split(flat, self.params)
        with torch.no_grad():
            if self.outer is None:
                for p, avg in zip(self.params, averaged):
                    p.copy_(avg)
                return
            for anchor, avg in zip(self.anchor, averaged):
                anchor.grad = anchor - avg  # the outer gradient: minus the averaged change
            self.outer.step()
            for p, anchor in zip(self.params, self.anchor):
                p.copy_(anchor)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
