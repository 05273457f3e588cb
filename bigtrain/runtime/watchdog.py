"""Hang watchdog: notices when training stops making progress on any rank, writes a diagnostic,
and ends the job, instead of letting a stalled rank freeze every other rank for half an hour.

It does not use collectives (a hung collective is what it must survive). Each rank runs a thread
that, every second, writes a heartbeat file (`run_dir/heartbeat/rank_N.json`: last finished step,
current phase, time of last progress) and reads everyone else's. A hang is either

- a rank whose heartbeat has not been written for `hang_timeout_s` (process stopped, frozen or
  dead), or
- no rank making progress for `hang_timeout_s` while none is inside a long operation that is known
  to keep the others waiting (start-up, data preparation, checkpoint save or load), e.g. ranks
  deadlocked in collectives.

A slow step, or a checkpoint save that keeps the other ranks waiting in a collective, is progress
and is left alone (the loop reports progress after every micro-batch and around every save). On a hang every live rank dumps its Python stacks; the lowest live rank writes
`run_dir/hang_report.txt` naming the stalled ranks and the last step of each, SIGKILLs stalled ranks
on its own host (a stopped process would otherwise hold up the launcher's teardown), and every live
rank exits with errors.HANG (124) so that a restart wrapper relaunches from the last checkpoint.
"""

import faulthandler
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bigtrain import errors

log = logging.getLogger("bigtrain")
BEAT_INTERVAL_S = 1.0
# Phases in which one rank may keep the others waiting for long without being hung.
BLOCKING_PHASES = {"starting", "preparing data", "loading checkpoint", "saving checkpoint"}


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, hang_timeout_s: float, job: str = ""):
        self.dir = run_dir / "heartbeat"
        self.report_path = run_dir / "hang_report.txt"
        self.rank = rank
        self.world_size = world_size
        self.hang_timeout_s = hang_timeout_s
        self.job = job  # the job's token: heartbeats of another job in this run dir are not ours
        self.host = socket.gethostname()
        self.step = 0
        self.phase = "starting"
        self.progress_time = self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bigtrain-watchdog", daemon=True)

    # -- called by the training loop

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"stacks_rank_{self.rank}.txt").unlink(missing_ok=True)  # from an earlier hang
        self._beat()
        self._thread.start()

    def progress(self, step: int | None = None, phase: str = "training") -> None:
        """Record that this rank moved on (finished a step, or entered/left a phase)."""
        self.phase = phase
        self.progress_time = time.time()
        if step is not None and step != self.step:
            self.step = step
            try:
                self._beat()  # at once, so a rank that stops right after still shows its last step
            except OSError:
                pass  # the thread writes again within a second

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- the thread

    def _run(self) -> None:
        while not self._stop.wait(BEAT_INTERVAL_S):
            try:
                self._beat()
                stalled = self._find_stall()
            except (OSError, ValueError, KeyError):
                continue  # a heartbeat replaced mid-read, a full disk: try again next beat
            if stalled is not None:
                self._end_job(*stalled)

    def _beat(self) -> None:
        beat = {
            "job": self.job, "rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step,
            "phase": self.phase, "progress_time": self.progress_time, "time": time.time(),
        }
        tmp = self.dir / f".rank_{self.rank}.{threading.get_ident()}.tmp"  # two writers: loop and thread
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, self.dir / f"rank_{self.rank}.json")

    def read_beats(self) -> dict[int, dict]:
        """Heartbeats of this job; files left by an earlier job in the same run dir are ignored."""
        beats = {}
        for rank in range(self.world_size):
            path = self.dir / f"rank_{rank}.json"
            if path.is_file():
                beat = json.loads(path.read_text())
                if beat.get("job") == self.job and (beat["time"] >= self.started_at - self.hang_timeout_s / 2
                                                    or rank == self.rank):
                    beats[rank] = beat
        return beats

    def _find_stall(self) -> tuple[list[int], str, dict] | None:
        """(stalled ranks, why, beats) when the job is hung, else None."""
        now = time.time()
        beats = self.read_beats()
        silent = [r for r, b in beats.items() if now - b["time"] > self.hang_timeout_s]
        if silent:
            return silent, "no heartbeat (process stopped, frozen or dead)", beats
        if len(beats) < self.world_size:
            return None  # still starting up
        if any(b["phase"] in BLOCKING_PHASES for b in beats.values()):
            return None
        if all(now - b["progress_time"] > self.hang_timeout_s for b in beats.values()):
            behind = min(b["step"] for b in beats.values())
            stuck = [r for r, b in beats.items() if b["step"] == behind]
            return stuck, "no progress on any rank (blocked in a collective or deadlocked)", beats
        return None

    def _end_job(self, stalled: list[int], why: str, beats: dict) -> None:
        stacks = self.dir / f"stacks_rank_{self.rank}.txt"
        with stacks.open("w") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        live = [r for r in range(self.world_size) if r not in stalled or why.startswith("no progress")]
        if self.rank == min(live):
            time.sleep(2 * BEAT_INTERVAL_S)  # let the other live ranks dump their stacks
            self.report_path.write_text(self._report(stalled, why, beats))
            log.error("hang detected: %s on rank(s) %s; see %s", why, stalled, self.report_path)
            if not why.startswith("no progress"):  # deadlocked ranks exit by themselves
                self._kill_local(stalled, beats)
        os._exit(errors.HANG)

    def _report(self, stalled: list[int], why: str, beats: dict) -> str:
        now = time.time()
        lines = [
            f"bigtrain hang report: no progress for more than {self.hang_timeout_s:g} s",
            f"stalled rank(s): {stalled} ({why})",
            "",
            "rank  host            pid      last step  phase               since progress  since heartbeat",
        ]
        for rank in range(self.world_size):
            b = beats.get(rank)
            if b is None:
                lines.append(f"{rank:<5} (never wrote a heartbeat)")
                continue
            lines.append(
                f"{rank:<5} {b['host'][:15]:<15} {b['pid']:<8} {b['step']:<10} {b['phase'][:19]:<19} "
                f"{now - b['progress_time']:>8.1f} s      {now - b['time']:>8.1f} s"
            )
        lines += ["", "Python stacks of the ranks that could still answer:"]
        for rank in range(self.world_size):
            path = self.dir / f"stacks_rank_{rank}.txt"
            if path.is_file():
                lines += ["", f"--- rank {rank} ---", path.read_text()]
        lines += ["", f"The job exits with code {errors.HANG}; relaunch to resume from the last checkpoint."]
        return "\n".join(lines) + "\n"

    def _kill_local(self, stalled: list[int], beats: dict) -> None:
        """SIGKILL stalled ranks on this host a moment after we exit, so our exit code reaches the
        launcher first and a stopped process cannot hold up its teardown. Only process ids of this
        job's heartbeats that are whole numbers are passed on, as arguments, never through a shell."""
        pids = [str(beats[r]["pid"]) for r in stalled if r in beats and beats[r]["host"] == self.host
                and isinstance(beats[r]["pid"], int) and 1 < beats[r]["pid"] != os.getpid()]
        if pids:
            subprocess.Popen([sys.executable, "-c", KILL_LATER, str(signal.SIGKILL.value), *pids], start_new_session=True)


# Run as `python -c KILL_LATER SIGNAL PID...`: wait a second, then signal each process.
KILL_LATER = """
import os, sys, time
time.sleep(1)
for pid in sys.argv[2:]:
    try:
        os.kill(int(pid), int(sys.argv[1]))
    except OSError:
        pass  # already gone
"""
