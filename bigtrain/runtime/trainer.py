"""The training loop: steps (runtime/steps.py), a guard against non-finite losses, preemption on
SIGTERM/SIGINT, evaluation on held-out data, metrics and checkpoints."""

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from omegaconf import DictConfig

from bigtrain.comm.exchange import GradientExchange
from bigtrain.components.checkpoint.checkpointer import Checkpointer
from bigtrain.components.data.loader import BatchLoader
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.errors import NonFiniteError
from bigtrain.monitor.metrics import MetricsWriter, peak_memory_gb
from bigtrain.monitor.timing import StepTimer
from bigtrain.runtime.preemption import StopSignal
from bigtrain.runtime.steps import MicroBatchSteps, PipelineSteps, StepResult

log = logging.getLogger("bigtrain")


def causal_lm_loss(engine, batch: dict[str, torch.Tensor], num_items: int, sequence=None, tiled: int = 0):
    """The sum of `batch`'s next-token losses over `num_items`: on this rank's share of each sequence under
    sequence parallelism, in pieces of the sequence with tiled loss."""
    if sequence is not None:
        batch = sequence.shard(batch)
    if tiled > 1:
        from bigtrain.distributed.tiling import tiled_loss

        return tiled_loss(engine.module, batch, tiled, num_items)
    return engine(**batch, use_cache=False, num_items_in_batch=num_items).loss


@dataclass
class TrainOutcome:
    completed_steps: int
    final_loss: float | None
    preempted: bool = False


class Trainer:
    """Trains one rank from a given step to train.max_steps. `forward` and the checkpointer's `save`
    are the seams tests wrap to inject faults (a NaN loss, a slow rank, a slow save)."""

    def __init__(
        self,
        cfg: DictConfig,
        engine,
        loader: BatchLoader,
        checkpointer: Checkpointer,
        metrics: MetricsWriter | None,
        *,
        grid: ProcessGrid,
        flops_per_token: float,
        device: str,
        watchdog=None,
        exchange: GradientExchange | None = None,
        evaluator=None,
        pipeline_loss=None,
        sequence=None,
    ):
        self.engine = engine
        self.loader = loader
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.watchdog = watchdog
        self.evaluator = evaluator
        self.sequence = sequence  # SequenceParallel: cuts each batch to this rank's share of the sequence
        self.tiled_loss = cfg.train.tiled_loss
        self.exchange = exchange or GradientExchange(engine)
        self.max_steps = cfg.train.max_steps
        self.log_interval = cfg.logging.interval
        self.eval_interval = cfg.eval.interval if evaluator is not None else 0
        self.tokens_per_step = loader.plan.global_batch * cfg.train.seq_len
        self.flops_per_token = flops_per_token
        self.device = device
        self.max_nonfinite_steps = cfg.fault.max_nonfinite_steps
        self.max_overflow_steps = cfg.fault.max_overflow_steps
        self.straggler_factor = cfg.fault.straggler_factor
        self.rank = dist.get_rank()
        self.grad_accum = engine.gradient_accumulation_steps()
        self.timer = StepTimer(cfg.logging.step_breakdown, device=device)
        self.stop_signal = StopSignal()
        self.stop_requested = False  # agreed by all ranks in each step's flag exchange
        self.compute_time = 0.0  # this rank's data + forward time in the current logging window
        self.skipped_steps = self.consecutive_skips = self.consecutive_overflows = 0
        # Gradients are averaged over the data-parallel ranks and over grad_accum micro-batches; a
        # micro-batch's loss (its share of the step's token average) is scaled back up by both. A sequence
        # group's ranks hold different tokens of the same sequences: their gradients add up, except under
        # ZeRO-3, which averages over them as well (measured: DeepSpeed's reduce-scatter divides by
        # data x sequence ranks there, by data ranks at ZeRO 0-2).
        gradient_scale = self.grad_accum * grid.data * (grid.sequence if cfg.zero.stage == 3 else 1)
        if pipeline_loss is not None:
            self.steps = PipelineSteps(self, pipeline_loss, gradient_scale)
            self.loss_replicas = dist.get_world_size()  # the pipeline engine returns the whole step's loss
        else:
            self.steps = MicroBatchSteps(self, gradient_scale)
            self.loss_replicas = grid.tensor  # tensor-parallel ranks compute the same loss

    def train(self, start_step: int) -> TrainOutcome:
        """Train from `start_step` completed steps to max_steps."""
        self.stop_signal.install()
        try:
            return self._train(start_step)
        finally:
            self.stop_signal.uninstall()

    def _train(self, start_step: int) -> TrainOutcome:
        last_loss = None
        # Evaluations and periodic saves are left out of the step time (and so of tokens/s and MFU).
        window_start, window_steps, window_paused = time.perf_counter(), 0, 0.0
        completed = start_step
        for step in range(start_step, self.max_steps):
            lr = self.engine.get_lr()[0]
            with self.exchange.step(step):
                result = self.steps.run(step)
            completed = step + 1
            window_steps += 1
            if self.watchdog is not None:
                self.watchdog.progress(completed)
            if self.metrics is not None:
                self.metrics.step_done(completed)
            self._guard(completed, result)
            evaluation = {}
            if self._eval_due(completed):
                paused_at = time.perf_counter()
                evaluation = self._evaluate(completed)
                window_paused += time.perf_counter() - paused_at
            if self._should_log(completed, start_step) or evaluation or self.stop_requested:
                get_accelerator().synchronize()
                elapsed = time.perf_counter() - window_start - window_paused
                last_loss = self._log(completed, result, lr, elapsed / window_steps, window_steps, evaluation)
                window_start, window_steps, window_paused = time.perf_counter(), 0, 0.0
            if self.stop_requested:
                self._save(completed)
                log.warning("stopped at step %d on a signal; relaunch the same command to resume", completed)
                return TrainOutcome(completed, last_loss, preempted=True)
            # No periodic save in the middle of a run of skipped steps: if it ends in a stop, the
            # newest checkpoint should be the last one taken while training was healthy.
            healthy = self.consecutive_skips == 0
            if self.checkpointer.due(completed) and completed < self.max_steps and healthy:
                paused_at = time.perf_counter()
                self._save(completed)
                window_paused += time.perf_counter() - paused_at
        if start_step < self.max_steps and self.checkpointer.save_final:
            self._save(self.max_steps)
        return TrainOutcome(completed, last_loss)

    def forward(self, step: int, batch: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        """This micro-batch's share of optimizer step `step`'s (0-based) loss: the sum of its token losses
        over the `tokens` trained-on tokens of the whole global batch."""
        return causal_lm_loss(self.engine, batch, tokens, self.sequence, self.tiled_loss)

    def _save(self, completed: int) -> None:
        if self.watchdog is not None:  # other ranks may wait on this one: not a hang
            self.watchdog.progress(phase="saving checkpoint")
        self.checkpointer.save(completed, self.loader.plan.samples_before(completed))
        if self.watchdog is not None:
            self.watchdog.progress(phase="training")

    # -------------------------------------------------------------------------------- evaluation

    def _eval_due(self, completed: int) -> bool:
        return self.eval_interval > 0 and (completed % self.eval_interval == 0 or completed == self.max_steps)

    def _evaluate(self, completed: int) -> dict[str, float]:
        if self.watchdog is not None:
            self.watchdog.progress(phase="evaluating")
        val_loss = self.evaluator.evaluate()
        if self.watchdog is not None:
            self.watchdog.progress(phase="training")
        val_ppl = math.exp(min(val_loss, 700.0))
        log.info("step %d: val_loss %.4f (ppl %.1f) on held-out data", completed, val_loss, val_ppl)
        return {"val_loss": val_loss, "val_ppl": val_ppl}

    # ------------------------------------------------------------------------------------ guards

    def _guard(self, completed: int, result: StepResult) -> None:
        self._guard_overflows(completed, result.overflowed)
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning("step %d skipped: non-finite loss or gradient norm (%d in a row)",
                        completed, self.consecutive_skips)
            if self.consecutive_skips >= self.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.consecutive_skips} consecutive steps (up to step {completed}) had a "
                    "non-finite loss or gradient norm, so training stopped without saving; the last "
                    f"checkpoint ({self.checkpointer.latest()}) is intact. Lower optimizer.lr, check "
                    "the data, or raise fault.max_nonfinite_steps."
                )
            return
        self.consecutive_skips = 0
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # ZeRO-0/3 in fp32/bf16 apply such a step; the weights can no longer be trusted.
            raise NonFiniteError(
                f"Step {completed} had a non-finite gradient norm and its update was applied, so "
                "the weights are not trustworthy; training stopped without saving. The last "
                f"checkpoint ({self.checkpointer.latest()}) is intact: relaunch to resume from it, "
                "with a lower optimizer.lr or optimizer.grad_clip."
            )

    def _guard_overflows(self, completed: int, overflowed: bool) -> None:
        """fp16 skips a step whose gradients overflowed and lowers its loss scale: routine now and then,
        a divergence when it goes on. Stop at fault.max_overflow_steps in a row, with the non-finite
        exit code, rather than crash later at the loss scale's floor and be relaunched into the same."""
        if not overflowed:
            self.consecutive_overflows = 0
            return
        self.consecutive_overflows += 1
        if self.consecutive_overflows >= self.max_overflow_steps:
            raise NonFiniteError(
                f"{self.consecutive_overflows} consecutive steps (up to step {completed}) overflowed in fp16 and "
                "were skipped, so training stopped without saving; the last checkpoint "
                f"({self.checkpointer.latest()}) is intact. Lower optimizer.lr or optimizer.grad_clip, use "
                "precision=bf16, or raise fault.max_overflow_steps."
            )

    # ------------------------------------------------------------------------------------ logging

    def _should_log(self, completed: int, start_step: int) -> bool:
        return completed % self.log_interval == 0 or completed in (start_step + 1, self.max_steps)

    def step_loss(self, result: StepResult) -> float:
        """The step's token-averaged loss over the whole global batch, from every rank's part (every rank
        joins the reduction)."""
        loss = result.loss.detach().float().clone()
        dist.all_reduce(loss)
        return loss.item() / self.loss_replicas

    def _log(self, completed: int, result: StepResult, lr: float, step_time: float, window_steps: int,
             evaluation: dict[str, float]) -> float:
        loss = self.step_loss(result)
        grad_norm = None if result.skipped else self.engine.get_global_grad_norm()
        stragglers = self._find_stragglers()
        comm = self.exchange.bytes_per_step()
        record = {
            "step": completed,
            "loss": loss if math.isfinite(loss) else None,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "tflops": self.flops_per_token * self.tokens_per_step / step_time / 1e12,
            "mem_gb": peak_memory_gb(self.device),
            "skipped": result.skipped,
            "skipped_steps": self.skipped_steps,
            "stragglers": stragglers,
            **self.timer.take_window(window_steps),
            "comm_bytes": comm["total"] if comm else None,
            "comm_bytes_by_op": comm["by_op"] if comm else None,
            "samples_by_source": self.loader.samples_by_source(completed),
            **evaluation,
        }
        if self.metrics is not None:
            self.metrics.write(record)
        return loss

    def _find_stragglers(self) -> list[dict]:
        """Ranks whose data + forward time in this logging window exceeds the median rank's by
        straggler_factor. Step times are equal on all ranks (they wait for each other in the
        gradient exchange), so the comparison uses the time before the first collective."""
        times = torch.zeros(dist.get_world_size(), device=self.engine.device)
        times[self.rank] = self.compute_time
        dist.all_reduce(times)
        self.compute_time = 0.0
        median = times.median().item()
        if dist.get_world_size() < 2 or median <= 0:
            return []
        slow = [
            {"rank": r, "ratio": round(t / median, 2)}
            for r, t in enumerate(times.tolist())
            if t > self.straggler_factor * median
        ]
        for s in slow if self.rank == 0 else []:
            log.warning("straggler: rank %d spent %.1fx the median rank's time in data + forward",
                        s["rank"], s["ratio"])
        return slow
