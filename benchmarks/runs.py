"""Launch one bigtrain job for a benchmark and watch it: memory of the machine and of every rank,
time to the first finished step, and the metrics it wrote."""

import json
import subprocess
import time
from pathlib import Path

import psutil

from benchmarks.throughput import BIN, REPO, env


def used_memory_gb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 1e9


def launch_and_watch(overrides: list[str], ranks: int, run_dir: Path, log_path: Path,
                     swap_dir: Path | None = None) -> dict:
    """Run `deepspeed --module bigtrain.train` to the end, sampling memory twice a second.

    Returns the exit code, peak machine memory above what was in use before the launch, peak RSS of
    each rank (by RANK), seconds from launch to the first step in metrics.jsonl, wall time, the
    metrics records, and (with `swap_dir`) the peak size of the files under it.
    """
    command = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--module", "bigtrain.train",
               *overrides, f"run_dir={run_dir}"]
    baseline = used_memory_gb()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    peak_used, peak_rss, first_step_s, peak_swap = 0.0, {}, None, 0.0
    metrics = run_dir / "metrics.jsonl"
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        peak_used = max(peak_used, used_memory_gb() - baseline)
        if swap_dir is not None:
            peak_swap = max(peak_swap, sum(f.stat().st_size for f in swap_dir.rglob("*") if f.is_file()) / 1e9)
        try:
            for child in launcher.children(recursive=True):
                # the ranks: the launcher processes name the module too, but have no RANK
                rank = child.environ().get("RANK")
                if rank is not None and "bigtrain.train" in " ".join(child.cmdline()):
                    peak_rss[int(rank)] = max(peak_rss.get(int(rank), 0.0), child.memory_info().rss / 1e9)
        except psutil.Error:  # a rank ended between listing and reading
            pass
        if first_step_s is None and metrics.exists() and metrics.stat().st_size:
            first_step_s = time.perf_counter() - start
        time.sleep(0.5)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    result = {"exit_code": proc.returncode, "ok": proc.returncode == 0, "peak_used_gb": peak_used,
              "peak_rss_gb": [peak_rss[r] for r in sorted(peak_rss)], "time_to_first_step_s": first_step_s,
              "wall_s": time.perf_counter() - start, "records": records}
    if swap_dir is not None:
        result["swap_files_gb"] = peak_swap
    if not result["ok"]:
        result["log_tail"] = log_path.read_text()[-2000:]
    return result
