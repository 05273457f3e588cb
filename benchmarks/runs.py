"""Launch one bigtrain job for a benchmark and watch it: memory of the machine and of every rank,
time to the first finished step, and the metrics it wrote."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from benchmarks.throughput import BIN, REPO, env
from bigtrain.monitor.metrics import read_records


def used_memory_gb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 1e9


def free_port() -> int:
    """A TCP port nobody listens on now: the ranks' meeting point, so that a benchmark's job does not meet
    another job's ranks on the launcher's default port (29500) of a shared machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_of(process: psutil.Process) -> float:
    """A process's own peak resident set size so far (VmHWM), in GB; its current RSS where there is no /proc."""
    try:
        with open(f"/proc/{process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return process.memory_info().rss / 1e9


def launch_and_watch(overrides: list[str], ranks: int, run_dir: Path, log_path: Path,
                     swap_dir: Path | None = None, *, devices: list[str] | None = None,
                     memory_budget_gb: float | None = None, min_available_gb: float | None = None,
                     deadline_s: float | None = None, interval_s: float = 0.5) -> dict:
    """Run `deepspeed --module bigtrain.train` to the end, sampling memory every `interval_s`.

    Returns the exit code, peak machine memory above what was in use before the launch, peak RSS of
    each rank (by RANK: its VmHWM, so a peak between two samples counts), seconds from launch to the
    first step in metrics.jsonl, wall time, the metrics records, and (with `swap_dir`) the peak size
    of the files under it. `devices`: the launcher's device arguments (default `--num_gpus ranks`).
    The job is killed, and `killed` says why, when its ranks together hold more than
    `memory_budget_gb` of resident memory, when the machine has less than `min_available_gb` left
    (other programs on it keep theirs), or when it runs longer than `deadline_s`.
    """
    command = [str(BIN / "deepspeed"), *(devices or ["--num_gpus", str(ranks)]), "--master_port", str(free_port()),
               "--module", "bigtrain.train", *overrides, f"run_dir={run_dir}"]
    baseline = used_memory_gb()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # a session of its own, so that a kill reaches the launcher and every rank
        proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    peak_used, peak_rss, first_step_s, peak_swap, killed = 0.0, {}, None, 0.0, None
    metrics = run_dir / "metrics.jsonl"
    launcher = psutil.Process(proc.pid)
    rank_processes: dict[int, psutil.Process] = {}
    try:
        while proc.poll() is None:
            peak_used = max(peak_used, used_memory_gb() - baseline)
            if swap_dir is not None:
                peak_swap = max(peak_swap, sum(f.stat().st_size for f in swap_dir.rglob("*") if f.is_file()) / 1e9)
            held = 0.0
            try:
                if len(rank_processes) < ranks:
                    for child in launcher.children(recursive=True):
                        # the ranks: the launcher processes name the module too, but have no RANK
                        rank = child.environ().get("RANK")
                        if rank is not None and "bigtrain.train" in " ".join(child.cmdline()):
                            rank_processes[int(rank)] = child
                for rank, process in rank_processes.items():
                    peak_rss[rank] = max(peak_rss.get(rank, 0.0), peak_rss_of(process))
                    held += process.memory_info().rss / 1e9
            except psutil.Error:  # a rank ended between listing and reading
                pass
            if first_step_s is None and metrics.exists() and metrics.stat().st_size:
                first_step_s = time.perf_counter() - start
            if memory_budget_gb is not None and held > memory_budget_gb:
                killed = f"over the memory budget: ranks held {held:.1f} GB > {memory_budget_gb:.1f} GB"
            elif min_available_gb is not None and psutil.virtual_memory().available / 1e9 < min_available_gb:
                killed = (f"machine memory nearly exhausted: less than {min_available_gb:.1f} GB available, "
                          f"ranks held {held:.1f} GB")
            elif deadline_s is not None and time.perf_counter() - start > deadline_s:
                killed = f"over the time limit of {deadline_s:.0f} s"
            if killed:
                _kill(proc)
                break
            time.sleep(interval_s)
    finally:
        if proc.poll() is None:
            _kill(proc)
    records = read_records(metrics)[0]  # a line cut short by a kill is left out
    result = {"exit_code": proc.returncode, "ok": proc.returncode == 0 and not killed, "peak_used_gb": peak_used,
              "peak_rss_gb": [peak_rss[r] for r in sorted(peak_rss)], "time_to_first_step_s": first_step_s,
              "wall_s": time.perf_counter() - start, "records": records, "killed": killed}
    if swap_dir is not None:
        result["swap_files_gb"] = peak_swap
    if not result["ok"]:
        result["log_tail"] = log_path.read_text()[-2000:]
    return result


def _kill(proc: subprocess.Popen) -> None:
    """End the launcher's whole session (launcher and ranks) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
