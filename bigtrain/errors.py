"""What can end a run, and the exit code each ends it with: one table for the entry point, the
Python API and the launchers' restart wrapper (launchers/restart.sh relaunches only what a
relaunch can fix)."""

OK = 0
PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; relaunch to resume
HANG = 124  # the watchdog found a stalled rank; see run_dir/hang_report.txt


class BigtrainError(Exception):
    """A run ended for a reason bigtrain understands; the message says what happened and what to do."""

    exit_code = 1


class ConfigError(BigtrainError, ValueError):
    """Bad config or input, found before any heavy work: nothing was trained, relaunching will not help."""

    exit_code = 2


class NonFiniteError(BigtrainError, RuntimeError):
    """Too many consecutive non-finite steps; the last healthy checkpoint is the newest."""

    exit_code = 3


class CheckpointError(BigtrainError, RuntimeError):
    """A checkpoint could not be written or read (disk full, unwritable); the previous one is intact."""

    exit_code = 4


class PeerLostError(BigtrainError, RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""

    exit_code = 5


# Every exit code a rank can end with, and what it means (for messages and the README).
EXIT_CODES: dict[int, str] = {
    OK: "finished",
    ConfigError.exit_code: "bad config or input",
    NonFiniteError.exit_code: "stopped after repeated non-finite steps",
    CheckpointError.exit_code: "a checkpoint could not be saved",
    PeerLostError.exit_code: "a rank died or stopped answering",
    PREEMPTED: "stopped by a signal after saving",
    HANG: "a hang was detected",
}


def exit_code_of(err: BaseException) -> int:
    """The exit code a rank ends with for `err` (1 for anything bigtrain did not anticipate)."""
    return err.exit_code if isinstance(err, BigtrainError) else 1


def meaning(code: int) -> str:
    return EXIT_CODES.get(code, "error")
