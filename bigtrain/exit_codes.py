"""Exit codes of a bigtrain rank, for launchers and restart wrappers (launchers/restart.sh)."""

OK = 0
CONFIG_ERROR = 2  # bad config or input; nothing was trained; relaunching will not help
NONFINITE = 3  # too many consecutive non-finite steps; the last healthy checkpoint is the newest
CHECKPOINT_FAILED = 4  # a save failed (disk full, unwritable); the previous checkpoint is intact
PEER_LOST = 5  # a collective failed or timed out: another rank died or stopped answering
PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; relaunch to resume
HANG = 124  # the watchdog found a stalled rank; see run_dir/hang_report.txt
