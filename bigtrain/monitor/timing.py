"""Where a step's time goes: data wait, forward, backward and optimizer step, summed per logging window."""

import time
from contextlib import contextmanager

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    """Wall time per phase over the current logging window.

    Device work is asynchronous on a GPU, so each phase ends with a synchronize (when `synchronize`
    is given): otherwise a phase would be charged for the kernels queued by the one before it. On
    the CPU the synchronize is a no-op.
    """

    def __init__(self, enabled: bool = True, synchronize=None):
        self.enabled = enabled
        self.synchronize = synchronize
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.timed = False

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.totals[name] += time.perf_counter() - started
            self.timed = True

    def take_window(self, steps: int) -> dict[str, float | None]:
        """Mean seconds per step of each phase since the last call (None where nothing was timed,
        e.g. under pipeline parallelism, whose engine runs whole steps itself); resets the window."""
        means = {f"{name}_s": (total / steps if self.timed else None) for name, total in self.totals.items()}
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.timed = False
        return means
