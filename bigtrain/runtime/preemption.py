"""Preemption: a SIGTERM or SIGINT asks the loop to stop after the current step and save."""

import logging
import os
import signal
import time

log = logging.getLogger("bigtrain")


class StopSignal:
    """First SIGTERM/SIGINT: ask the loop to stop after the current step (and save). Another one
    more than REPEAT_AFTER_S later: exit now. Signals closer together are one request: Ctrl-C
    reaches every rank and the launcher, which then forwards a SIGTERM of its own."""

    REPEAT_AFTER_S = 5.0

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
        self._previous = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self._received_at > self.REPEAT_AFTER_S:
                os._exit(128 + signum)
            return
        self.received, self._received_at = signum, time.monotonic()
        log.warning("received %s: finishing this step, saving a checkpoint, then exiting "
                    "(send it again to exit at once)", signal.Signals(signum).name)
