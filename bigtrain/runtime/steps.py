"""One optimizer step: grad_accum micro-batches through the DeepSpeed engine, forward, backward and the
update, with the loss averaged over tokens and non-finite losses kept out of the gradients.

The loss of a step is the sum of the token losses of the whole global batch (every micro-batch of
every data-parallel rank) divided by its count of trained-on tokens, so an update does not depend on
how the batch is split into micro-batches and ranks (nor on how many tokens a micro-batch happens to
mask). Every rank knows that count from the data alone (BatchLoader.step_label_count). A micro-batch
contributes sum / count; DeepSpeed divides each backward pass by grad_accum and averages gradients over
the data-parallel ranks, so the backward pass is given that times grad_accum x data-parallel size
(gradient_scale).
"""

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigtrain.errors import NonFiniteError

log = logging.getLogger("bigtrain")


@dataclass
class StepResult:
    loss: torch.Tensor
    """This rank's part of the step's token-averaged loss (see Trainer.step_loss for the whole)."""
    skipped: bool
    """The update was skipped (a non-finite loss or gradient norm); the weights did not change."""
    overflowed: bool = False
    """fp16 skipped the update for overflowing gradients (routine loss-scale calibration)."""


class MicroBatchSteps:
    """Steps of a (non-pipeline) engine: ZeRO 0-3, with or without offload, tensor parallelism."""

    def __init__(self, trainer, gradient_scale: float):
        self.t = trainer
        self.engine = trainer.engine
        self.gradient_scale = gradient_scale
        self.flags = torch.zeros(2, device=self.engine.device)

    def run(self, step: int) -> StepResult:
        """Each micro-batch's loss is checked on all ranks before its backward pass: a NaN/Inf there
        would poison the gradients of every rank. A step whose first micro-batch is non-finite is
        skipped whole (no backward, no optimizer step, weights unchanged); a later non-finite
        micro-batch is left out of the step's gradient."""
        t, engine = self.t, self.engine
        tokens = t.loader.step_label_count(step)
        total = torch.zeros((), device=engine.device)
        nonfinite_loss = False
        for micro in range(t.grad_accum):
            started = time.perf_counter()
            with t.timer.phase("data"):
                batch = {k: v.to(engine.device) for k, v in t.loader.micro_batch(step, micro).items()}
            with t.timer.phase("forward"):
                loss = t.forward(step, batch, tokens)
            t.compute_time += time.perf_counter() - started
            if t.watchdog is not None:
                t.watchdog.progress()
            if not self._finite_on_all_ranks(loss, first=micro == 0):
                if micro == 0:
                    return StepResult(loss.detach(), skipped=True)
                # Earlier micro-batches are already accumulated: finish the step without this one.
                # A zero loss from a fresh two-token forward gives every parameter a zero gradient,
                # so DeepSpeed's gradient exchange runs on every rank as usual.
                log.warning("step %d: micro-batch %d has a non-finite loss; left out of the step", step + 1, micro)
                loss = engine(input_ids=batch["input_ids"][:1, :2], use_cache=False).logits.float().sum() * 0.0
                nonfinite_loss = True
            with t.timer.phase("backward"):
                engine.backward(loss * self.gradient_scale)
            with t.timer.phase("optimizer"):
                if engine.is_gradient_accumulation_boundary():
                    t.exchange.reduce_gradients()
                self._optimizer_step()
            total += loss.detach().float()
        # DeepSpeed skips a ZeRO step whose gradient norm is not finite. Under fp16 that is routine
        # loss-scale calibration, not a fault, unless the loss itself was non-finite.
        overflow = not engine.was_step_applied()
        fp16 = engine.fp16_enabled()
        return StepResult(total, skipped=overflow and (nonfinite_loss or not fp16),
                          overflowed=overflow and fp16 and not nonfinite_loss)

    def _optimizer_step(self) -> None:
        try:
            self.engine.step()
        except Exception as err:  # DeepSpeed raises a bare Exception when fp16's loss scale hits its floor
            if "loss scale" not in str(err).lower():
                raise
            raise NonFiniteError(
                f"fp16's loss scale fell to its minimum ({' '.join(str(err).split())[:200]}): the gradients keep "
                "overflowing, so training stopped without saving. The last checkpoint "
                f"({self.t.checkpointer.latest()}) is intact: relaunch from it with a lower optimizer.lr, "
                "optimizer.grad_clip, or precision=bf16."
            ) from None

    def _finite_on_all_ranks(self, loss: torch.Tensor, first: bool) -> bool:
        """Whether the micro-batch's loss is finite on every rank, before its backward pass. The first
        micro-batch of a step also carries each rank's stop request, so that a step costs one host
        synchronization for both (grad_accum > 1 adds one for each later micro-batch)."""
        flags = self.flags
        flags[0] = (~torch.isfinite(loss.detach()).all()).float()
        flags[1] = 1.0 if first and self.t.stop_signal.received is not None else 0.0
        dist.all_reduce(flags)
        nonfinite, stop = flags.tolist()
        if first:
            self.t.stop_requested = stop > 0
        return nonfinite == 0.0


class PipelineSteps:
    """Steps of DeepSpeed's pipeline engine: train_batch streams the grad_accum micro-batches through
    the stages, forward and backward, then steps the optimizer, and returns the step's loss on every
    rank. The loss function (distributed/pipeline.py) is told the step's token count first."""

    def __init__(self, trainer, loss_fn, gradient_scale: float):
        self.t = trainer
        self.engine = trainer.engine
        self.loss_fn = loss_fn
        self.gradient_scale = gradient_scale
        self.flag = torch.zeros(1, device=self.engine.device)

    def run(self, step: int) -> StepResult:
        """The loss is known only once the update is made, so a non-finite one cannot be kept out of
        it: unless DeepSpeed skipped the step itself, the run stops (NonFiniteError)."""
        t = self.t
        self.loss_fn.set_step(t.loader.step_label_count(step), self.gradient_scale)
        micro_batches = (t.loader.micro_batch(step, m) for m in range(t.grad_accum))
        loss = self.engine.train_batch(data_iter=((b["input_ids"], b["labels"]) for b in micro_batches))
        if t.watchdog is not None:
            t.watchdog.progress()
        t.stop_requested = self._any_rank_signalled()
        skipped = not self.engine.was_step_applied()
        if not skipped and not torch.isfinite(loss).all():
            raise NonFiniteError(
                f"Step {step + 1} had a non-finite loss, and under pipeline parallelism its update was "
                "applied before the loss was known, so the weights are not trustworthy; training stopped "
                f"without saving. The last checkpoint ({t.checkpointer.latest()}) is intact: relaunch "
                "to resume from it, with a lower optimizer.lr or optimizer.grad_clip."
            )
        return StepResult(loss.detach(), skipped)

    def _any_rank_signalled(self) -> bool:
        """All ranks agree on stopping, whichever rank the signal reached."""
        self.flag.fill_(1.0 if self.t.stop_signal.received is not None else 0.0)
        dist.all_reduce(self.flag)
        return self.flag.item() > 0
