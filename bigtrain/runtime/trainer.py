"""The training loop: micro-batches through the DeepSpeed engine, a guard against non-finite
losses, preemption on SIGTERM/SIGINT, metrics and checkpoints."""

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
from bigtrain.errors import NonFiniteError
from bigtrain.monitor.metrics import MetricsWriter, peak_memory_gb
from bigtrain.monitor.timing import StepTimer
from bigtrain.runtime.preemption import StopSignal

log = logging.getLogger("bigtrain")


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
        flops_per_token: float,
        device: str,
        watchdog=None,
        exchange: GradientExchange | None = None,
    ):
        self.engine = engine
        self.loader = loader
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.max_steps = cfg.train.max_steps
        self.log_interval = cfg.logging.interval
        self.tokens_per_step = loader.plan.global_batch * cfg.train.seq_len
        self.flops_per_token = flops_per_token
        self.device = device
        self.max_nonfinite_steps = cfg.fault.max_nonfinite_steps
        self.straggler_factor = cfg.fault.straggler_factor
        self.watchdog = watchdog
        self.exchange = exchange or GradientExchange(engine)
        self.rank = dist.get_rank()
        self.compute_time = 0.0  # this rank's data + forward time in the current logging window
        self.grad_accum = engine.gradient_accumulation_steps()
        self.pipelined = hasattr(engine, "train_batch")  # a PipelineEngine runs whole steps itself
        self.stop_signal = StopSignal()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._device_flag = torch.zeros(2, device=engine.device)
        self.overflowed = False
        self.timer = StepTimer(cfg.logging.step_breakdown, device=device)
        self.fp16 = engine.fp16_enabled()
        self.max_overflow_steps = cfg.fault.max_overflow_steps
        self.consecutive_overflows = 0
        self.stop_requested = False  # agreed by all ranks in the step's first flag exchange

    def train(self, start_step: int) -> TrainOutcome:
        """Train from `start_step` completed steps to max_steps."""
        self.stop_signal.install()
        try:
            return self._train(start_step)
        finally:
            self.stop_signal.uninstall()

    def _train(self, start_step: int) -> TrainOutcome:
        last_loss = None
        window_start, window_steps = time.perf_counter(), 0
        completed = start_step
        for step in range(start_step, self.max_steps):
            lr = self.engine.get_lr()[0]
            with self.exchange.step(step):
                loss, skipped = self.train_step(step)
            completed = step + 1
            window_steps += 1
            if self.watchdog is not None:
                self.watchdog.progress(completed)
            if self.metrics is not None:
                self.metrics.step_done(completed)
            self._guard(completed, skipped)
            stop_requested = self._any_rank_signalled() if self.pipelined else self.stop_requested
            if self._should_log(completed, start_step) or stop_requested:
                get_accelerator().synchronize()
                elapsed = time.perf_counter() - window_start
                last_loss = self._log(completed, loss, lr, elapsed / window_steps, skipped, window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if stop_requested:
                self._save(completed)
                log.warning("stopped at step %d on a signal; relaunch the same command to resume", completed)
                return TrainOutcome(completed, last_loss, preempted=True)
            # No periodic save in the middle of a run of skipped steps: if it ends in a stop, the
            # newest checkpoint should be the last one taken while training was healthy.
            healthy = self.consecutive_skips == 0
            if self.checkpointer.due(completed) and completed < self.max_steps and healthy:
                self._save(completed)
        if start_step < self.max_steps and self.checkpointer.save_final:
            self._save(self.max_steps)
        return TrainOutcome(completed, last_loss)

    def _save(self, completed: int) -> None:
        if self.watchdog is not None:  # other ranks may wait on this one: not a hang
            self.watchdog.progress(phase="saving checkpoint")
        self.checkpointer.save(completed, self.loader.plan.samples_before(completed))
        if self.watchdog is not None:
            self.watchdog.progress(phase="training")

    def train_step(self, step: int) -> tuple[torch.Tensor, bool]:
        """One optimizer step over grad_accum micro-batches.

        Returns this rank's mean loss and whether the update was skipped. Each micro-batch's loss is
        checked on all ranks before its backward pass: a NaN/Inf there would poison the gradients
        of every rank. A step whose first micro-batch is non-finite is skipped whole (no backward,
        no optimizer step, weights unchanged); a later non-finite micro-batch is left out of the
        step's gradient.
        """
        if self.pipelined:
            return self._pipeline_step(step)
        total = torch.zeros((), device=self.engine.device)
        nonfinite_loss = False
        for micro in range(self.grad_accum):
            started = time.perf_counter()
            with self.timer.phase("data"):
                input_ids = self.loader.micro_batch(step, micro).to(self.engine.device)
            with self.timer.phase("forward"):
                loss = self.forward(step, input_ids)
            self.compute_time += time.perf_counter() - started
            if self.watchdog is not None:
                self.watchdog.progress()
            if not self._finite_on_all_ranks(loss, first=micro == 0):
                if micro == 0:
                    return loss.detach(), True
                # Earlier micro-batches are already accumulated: finish the step without this one.
                # A zero loss from a fresh two-token forward gives every parameter a zero gradient,
                # so DeepSpeed's gradient exchange runs on every rank as usual.
                log.warning("step %d: micro-batch %d has a non-finite loss; left out of the step",
                            step + 1, micro)
                loss = self.engine(input_ids=input_ids[:1, :2]).logits.float().sum() * 0.0
                nonfinite_loss = True
            with self.timer.phase("backward"):
                self.engine.backward(loss)
            with self.timer.phase("optimizer"):
                if self.engine.is_gradient_accumulation_boundary():
                    self.exchange.reduce_gradients()
                self._optimizer_step()
            total += loss.detach().float()
        # DeepSpeed skips a ZeRO step whose gradient norm is not finite. Under fp16 that is routine
        # loss-scale calibration, not a fault, unless the loss itself was non-finite.
        overflow = not self.engine.was_step_applied()
        self.overflowed = overflow and self.fp16 and not nonfinite_loss
        skipped = overflow and (nonfinite_loss or not self.fp16)
        return total / self.grad_accum, skipped

    def _optimizer_step(self) -> None:
        try:
            self.engine.step()
        except Exception as err:  # DeepSpeed raises a bare Exception when fp16's loss scale hits its floor
            if "loss scale" not in str(err).lower():
                raise
            raise NonFiniteError(
                f"fp16's loss scale fell to its minimum ({' '.join(str(err).split())[:200]}): the gradients keep "
                "overflowing, so training stopped without saving. The last checkpoint "
                f"({self.checkpointer.latest()}) is intact: relaunch from it with a lower optimizer.lr, "
                "optimizer.grad_clip, or precision=bf16."
            ) from None

    def forward(self, step: int, input_ids: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch of optimizer step `step` (0-based)."""
        return self.engine(input_ids=input_ids, labels=input_ids).loss

    def _pipeline_step(self, step: int) -> tuple[torch.Tensor, bool]:
        """One step of DeepSpeed's pipeline schedule: train_batch streams the grad_accum micro-batches
        through the stages, forward and backward, then steps the optimizer, and returns the mean loss
        on every rank. The loss is known only once the update is made, so a non-finite one cannot be
        kept out of it: unless DeepSpeed skipped the step itself, the run stops (NonFiniteError)."""
        micro_batches = (self.loader.micro_batch(step, m) for m in range(self.grad_accum))
        loss = self.engine.train_batch(data_iter=((ids, ids) for ids in micro_batches))
        if self.watchdog is not None:
            self.watchdog.progress()
        skipped = not self.engine.was_step_applied()
        if not skipped and not torch.isfinite(loss).all():
            raise NonFiniteError(
                f"Step {step + 1} had a non-finite loss, and under pipeline parallelism its update was "
                "applied before the loss was known, so the weights are not trustworthy; training stopped "
                f"without saving. The last checkpoint ({self.checkpointer.latest()}) is intact: relaunch "
                "to resume from it, with a lower optimizer.lr or optimizer.grad_clip."
            )
        return loss.detach(), skipped

    def _finite_on_all_ranks(self, loss: torch.Tensor, first: bool) -> bool:
        """Whether the micro-batch's loss is finite on every rank, before its backward pass. The first
        micro-batch of a step also carries each rank's stop request, so that a step costs one host
        synchronization for both (grad_accum > 1 adds one for each later micro-batch)."""
        flags = self._device_flag
        flags[0] = (~torch.isfinite(loss.detach()).all()).float()
        flags[1] = 1.0 if first and self.stop_signal.received is not None else 0.0
        dist.all_reduce(flags)
        nonfinite, stop = flags.tolist()
        if first:
            self.stop_requested = stop > 0
        return nonfinite == 0.0

    def _any_rank_signalled(self) -> bool:
        """All ranks agree on stopping, whichever rank the signal reached."""
        flag = self._device_flag[1:]
        flag.fill_(1.0 if self.stop_signal.received is not None else 0.0)
        dist.all_reduce(flag)
        return flag.item() > 0

    def _guard(self, completed: int, skipped: bool) -> None:
        self._guard_overflows(completed)
        if skipped:
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

    def _guard_overflows(self, completed: int) -> None:
        """fp16 skips a step whose gradients overflowed and lowers its loss scale: routine now and then,
        a divergence when it goes on. Stop at fault.max_overflow_steps in a row, with the non-finite
        exit code, rather than crash later at the loss scale's floor and be relaunched into the same."""
        if not getattr(self, "overflowed", False):
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

    def _should_log(self, completed: int, start_step: int) -> bool:
        return completed % self.log_interval == 0 or completed in (start_step + 1, self.max_steps)

    def _log(self, completed: int, loss: torch.Tensor, lr: float, step_time: float, skipped: bool,
             window_steps: int = 1) -> float:
        # Every rank joins the reduction; only rank 0 writes.
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / dist.get_world_size()
        grad_norm = None if skipped else self.engine.get_global_grad_norm()
        stragglers = self._find_stragglers()
        comm = self.exchange.bytes_per_step()
        record = {
            "step": completed,
            "loss": mean_loss if math.isfinite(mean_loss) else None,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "tflops": self.flops_per_token * self.tokens_per_step / step_time / 1e12,
            "mem_gb": peak_memory_gb(self.device),
            "skipped": skipped,
            "skipped_steps": self.skipped_steps,
            "stragglers": stragglers,
            **self.timer.take_window(window_steps),
            "comm_bytes": comm["total"] if comm else None,
            "comm_bytes_by_op": comm["by_op"] if comm else None,
        }
        if self.metrics is not None:
            self.metrics.write(record)
        return mean_loss
