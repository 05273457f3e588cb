"""The training loop: micro-batches through the DeepSpeed engine, metrics, checkpoints."""

import logging
import time

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from bigtrain.checkpoint import Checkpointer
from bigtrain.data import BatchLoader
from bigtrain.metrics import MetricsWriter, peak_memory_gb

log = logging.getLogger("bigtrain")


class Trainer:
    def __init__(
        self,
        engine,
        loader: BatchLoader,
        checkpointer: Checkpointer,
        metrics: MetricsWriter | None,
        *,
        max_steps: int,
        log_interval: int,
        tokens_per_step: int,
        flops_per_token: float,
        device: str,
    ):
        self.engine = engine
        self.loader = loader
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.max_steps = max_steps
        self.log_interval = log_interval
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.device = device
        self.grad_accum = engine.gradient_accumulation_steps()

    def train(self, start_step: int) -> float | None:
        """Train from `start_step` completed steps to max_steps; return the last logged loss."""
        last_loss = None
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start_step, self.max_steps):
            lr = self.engine.get_lr()[0]
            loss = self.train_step(step)
            completed = step + 1
            window_steps += 1
            if self._should_log(completed, start_step):
                get_accelerator().synchronize()
                elapsed = time.perf_counter() - window_start
                last_loss = self._log(completed, loss, lr, elapsed / window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if self.checkpointer.due(completed) and completed < self.max_steps:
                self.checkpointer.save(completed)
        if start_step < self.max_steps:
            self.checkpointer.save(self.max_steps)
        return last_loss

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns this rank's mean loss."""
        total = torch.zeros((), device=self.engine.device)
        for micro in range(self.grad_accum):
            input_ids = self.loader.micro_batch(step, micro).to(self.engine.device)
            loss = self.engine(input_ids=input_ids, labels=input_ids).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return total / self.grad_accum

    def _should_log(self, completed: int, start_step: int) -> bool:
        return completed % self.log_interval == 0 or completed in (start_step + 1, self.max_steps)

    def _log(self, completed: int, loss: torch.Tensor, lr: float, step_time: float) -> float:
        # Every rank joins the reduction; only rank 0 writes.
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / dist.get_world_size()
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": completed,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "tflops": self.flops_per_token * self.tokens_per_step / step_time / 1e12,
            "mem_gb": peak_memory_gb(self.device),
        }
        if self.metrics is not None:
            self.metrics.write(record)
        return mean_loss
