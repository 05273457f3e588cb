"""The hooks the training loop calls around each optimizer step: switch DeepSpeed's gradient
all-reduce off for bigtrain's own exchange once the warm-up is over, run that exchange at the
accumulation boundary, and count the bytes each step sends."""

from contextlib import contextmanager
from typing import Protocol

import torch

from bigtrain.comm.wire import WireCounter


class Method(Protocol):
    def reduce(self, grads: list[torch.Tensor]) -> None:
        """Called at the accumulation boundary, before the optimizer step, on every rank."""

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (0-based), on every rank."""


class GradientExchange:
    def __init__(self, engine, method: Method | None = None, warmup_steps: int = 0,
                 counter: WireCounter | None = None):
        self.engine = engine
        self.method = method
        self.warmup_steps = warmup_steps
        self.counter = counter
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.active = False

    @contextmanager
    def step(self, step: int):
        """Wraps one optimizer step (all its micro-batches). Its collectives alone are counted."""
        if self.method is not None:
            self.active = step >= self.warmup_steps
            # Read by engine.backward at the boundary micro-batch: off, the gradients stay local.
            self.engine.enable_backward_allreduce = not self.active
        if self.counter is not None:
            self.counter.discard()
        yield
        if self.active:
            self.method.after_step(step)
        if self.counter is not None:
            self.counter.collect_step()

    def reduce_gradients(self) -> None:
        """At the accumulation boundary, before engine.step(): bigtrain's exchange, if active."""
        if self.active:
            self.method.reduce(self.gradients())

    def gradients(self) -> list[torch.Tensor]:
        # As DeepSpeed's own all-reduce does: a parameter without a gradient contributes zeros.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def bytes_per_step(self) -> dict[str, float] | None:
        """Mean bytes sent per step since the last call, in total and by collective."""
        if self.counter is None:
            return None
        by_op = self.counter.take_window()
        if by_op is None:
            return None
        return {"total": sum(by_op.values()), "by_op": by_op}
