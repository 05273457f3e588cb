"""Where a step's time goes: data wait, forward, backward and optimizer step, summed per logging window.

On the CPU each phase is timed with the wall clock. On a GPU, where the host only queues work, a
phase is the time between two CUDA events recorded around it on the compute stream: nothing waits for
the device while training, and the events are read once per logging window (a single synchronize)."""

import time
from contextlib import contextmanager

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    def __init__(self, enabled: bool = True, device: str = "cpu", event_factory=None):
        self.enabled = enabled
        self.events = device == "cuda"
        if self.events and event_factory is None:
            import torch

            event_factory = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        self.event_factory = event_factory
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.pending: list[tuple[str, object, object]] = []  # (phase, start event, end event)
        self.timed = False

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self.timed = True
        if self.events:
            start = self.event_factory()
            start.record()
            try:
                yield
            finally:
                end = self.event_factory()
                end.record()
                self.pending.append((name, start, end))
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - started

    def take_window(self, steps: int) -> dict[str, float | None]:
        """Mean seconds per step of each phase since the last call (None where nothing was timed,
        e.g. under pipeline parallelism, whose engine runs whole steps itself); resets the window."""
        if self.pending:
            self.pending[-1][2].synchronize()  # the last event done means every earlier one is
            for name, start, end in self.pending:
                self.totals[name] += start.elapsed_time(end) / 1000.0  # ms
            self.pending.clear()
        means = {f"{name}_s": (total / steps if self.timed else None) for name, total in self.totals.items()}
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.timed = False
        return means
