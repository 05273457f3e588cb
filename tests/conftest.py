"""Shared helpers: launch real bigtrain runs (one or more ranks) and read what they wrote."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small, fast runs: 10 logged steps of the tiny model.
FAST = ["train.max_steps=10", "logging.interval=1", "scheduler.warmup_steps=2", "train.micro_batch_size=4", "train.seq_len=64"]


def launcher_command(launcher: str, nproc: int, overrides: list[str]) -> list[str]:
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, "-m", "bigtrain.train", *overrides]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                "-m", "bigtrain.train", *overrides]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                "--module", "bigtrain.train", *overrides]
    raise ValueError(launcher)


def run_command(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher in a session of its own; on timeout kill the whole session, ranks included,
    so that a stuck test cannot leave ranks loading the machine for the tests after it."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {command}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_bigtrain(launcher: str, nproc: int, overrides: list[str], cwd: Path, timeout: float = 300):
    """Run bigtrain under a real launcher in `cwd`; fail the test with its output if it fails."""
    proc = run_command(launcher_command(launcher, nproc, overrides), cwd, timeout)
    if proc.returncode != 0:
        pytest.fail(f"{launcher} run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




@pytest.fixture
def background():
    """Start runs in the background (output to a log file); whatever is left is killed at the end."""
    started = []

    def start(command: list[str], cwd: Path, log_path: Path, **env_extra):
        env = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu", **env_extra)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 180) -> None:
    """Block until metrics.jsonl shows `step` (or the process ended, or time ran out)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (code {proc.returncode}) before step {step}")
        time.sleep(0.2)
    pytest.fail(f"run did not reach step {step} in {timeout} s")


def rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the `bigtrain.train` rank processes under a launcher, indexed by rank."""
    import psutil

    children = psutil.Process(launcher_pid).children(recursive=True)
    ranks = [p for p in children if "bigtrain.train" in " ".join(p.cmdline()) and "RANK" in p.environ()]
    return [p.pid for p in sorted(ranks, key=lambda p: int(p.environ()["RANK"]))]
