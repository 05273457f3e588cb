"""Held-out evaluation: the loss on eval.batches global batches of validation samples, averaged over
their tokens across every rank.

The same samples every time (the validation stream from its start), under no_grad with the model in
eval mode, drawing no random numbers and leaving the training data's position alone: a run with
evaluation trains exactly as one without. Each rank sums its token losses; the sums and the token
count (known from the data on every rank) give the mean over the whole evaluation set, whatever the
layout: ranks holding the same tokens (tensor parallelism) count them alike in both.
"""

import torch
import torch.distributed as dist

from bigtrain.components.data.loader import BatchLoader
from bigtrain.runtime.trainer import causal_lm_loss


class Evaluator:
    def __init__(self, engine, loader: BatchLoader, batches: int, replicas: int, watchdog=None, pipeline_loss=None,
                 sequence=None):
        self.engine = engine
        self.loader = loader  # its plan: one micro-batch per data-parallel rank per eval batch
        self.batches = batches
        self.replicas = replicas
        self.watchdog = watchdog
        self.pipeline_loss = pipeline_loss
        self.sequence = sequence

    def evaluate(self) -> float:
        """Mean loss per trained-on token over the evaluation set."""
        tokens = sum(self.loader.step_label_count(b) for b in range(self.batches))
        was_training = self.engine.training
        self.engine.eval()
        try:
            with torch.no_grad():
                total = self._pipeline_sum() if self.pipeline_loss is not None else self._sum()
        finally:
            self.engine.train(was_training)
        return total / tokens

    def _sum(self) -> float:
        """Sum of every rank's token losses (each rank reads its slice of each eval batch)."""
        total = torch.zeros((), device=self.engine.device, dtype=torch.float64)
        for b in range(self.batches):
            batch = {k: v.to(self.engine.device) for k, v in self.loader.micro_batch(b, 0).items()}
            total += causal_lm_loss(self.engine, batch, 1, self.sequence).double()
            if self.watchdog is not None:
                self.watchdog.progress(phase="evaluating")
        dist.all_reduce(total)
        return total.item() / self.replicas

    def _pipeline_sum(self) -> float:
        """The pipeline engine's eval path: each micro-batch's token-loss sum, averaged over the micro-
        batches and the data-parallel ranks by the engine, and returned to every stage."""
        self.pipeline_loss.set_step(1, 1.0)
        plan = self.loader.plan
        data = ((b["input_ids"], b["labels"]) for b in (self.loader.micro_batch(i, 0) for i in range(self.batches)))
        mean = self.engine.eval_batch(data_iter=data, num_micro_batches=self.batches)
        if self.watchdog is not None:
            self.watchdog.progress(phase="evaluating")
        return float(mean) * self.batches * plan.dp_size
