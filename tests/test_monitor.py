"""Monitoring on a real 2-rank run: the step-time split, MFU, CPU use, ETA, the CSV, TensorBoard and
W&B (offline) sinks and DeepSpeed's flops profiler; and the progress bar of a run on a terminal."""

import csv
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
from conftest import FAST
from shared_run import RANKS, monitored_run, records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return monitored_run(tmp_path_factory)


@pytest.mark.multiprocess
def test_every_logged_step_has_the_split_mfu_and_cpu_use(run):
    run_dir, _ = run
    metrics = records(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    peaks = set()
    for m in metrics:
        parts = [m["data_s"], m["forward_s"], m["backward_s"], m["optimizer_s"]]
        assert all(p >= 0 for p in parts) and m["forward_s"] > 0 and m["backward_s"] > 0
        # The phases are inside the step; what is left is the loss checks and logging collectives.
        assert 0.6 * m["step_time_s"] <= sum(parts) <= m["step_time_s"]
        assert 0 < m["mfu"] < 1
        peaks.add(round(m["tflops"] / (m["mfu"] * RANKS), 9))  # one peak per run, measured at start-up
        assert m["cpu_util"] > 0
        assert m["eta_s"] == pytest.approx((10 - m["step"]) * m["step_time_s"])
        assert "gpu_util" not in m  # no NVML on a CPU run
    assert len(peaks) == 1
    elapsed = [m["elapsed_s"] for m in metrics]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0


@pytest.mark.multiprocess
def test_step_lines_show_mfu_and_the_time_left(run):
    _, stdout = run
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 10
    assert all("MFU " in line and " ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0s")


@pytest.mark.multiprocess
def test_csv_and_tensorboard_sinks_hold_the_logged_values(run):
    run_dir, _ = run
    metrics = records(run_dir)
    for field in ("loss", "mfu", "forward_s", "cpu_util"):
        with open(run_dir / "csv" / "train" / f"train_{field}.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["step", field]
        assert [(int(s), float(v)) for s, v in rows[1:]] == [(m["step"], pytest.approx(m[field])) for m in metrics]
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def wandb_history(path) -> list[dict]:
    """The history rows of a W&B run file: a LevelDB-style log (7-byte header ":W&B", then 32 KiB
    blocks of chunks, each with a 7-byte header: crc, length, type) of wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.multiprocess
def test_wandb_offline_run_holds_every_logged_step(run):
    """W&B in offline mode (no network here): one run under run_dir/wandb whose history has every
    logged step with the values of metrics.jsonl, indexed by bigtrain's step."""
    run_dir, _ = run
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, offline
    history = wandb_history(offline[0])
    metrics = records(run_dir)
    assert [row["train/step"] for row in history] == [m["step"] for m in metrics]
    for row, m in zip(history, metrics):
        assert row["train/loss"] == pytest.approx(m["loss"]) and row["train/mfu"] == pytest.approx(m["mfu"])
        assert row["train/forward_s"] == pytest.approx(m["forward_s"])


@pytest.mark.multiprocess
def test_flops_profiler_writes_its_profile_of_the_chosen_step(run):
    run_dir, _ = run
    profile = (run_dir / "flops_profile.txt").read_text()
    assert "DeepSpeed Flops Profiler" in profile and "Profile Summary at step 3" in profile
    assert "params per GPU:" in profile and "725.57 K" in profile  # debug_llama's 725,568 parameters


@pytest.mark.multiprocess
def test_progress_bar_with_eta_on_a_terminal(tmp_path):
    """A one-rank run whose stderr is a real terminal (a pty) draws tqdm's bar with its ETA."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    command = [sys.executable, "-m", "bigtrain.train", *FAST, "train.max_steps=4", "checkpoint.save_final=false",
               f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdin=follower, stdout=follower, stderr=follower,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu"))
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            proc.kill()
            pytest.fail(f"no output for 120 s:\n{screen.decode(errors='replace')[-3000:]}")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")[-3000:]
    text = screen.decode(errors="replace")
    assert "train: 100%" in text and "4/4 [" in text, text[-3000:]  # tqdm's bar: steps done / total, elapsed<ETA
    assert "<00:00" in text and ("step/s" in text or "s/step" in text)
    assert "step      4/4" in text  # the step lines still print, above the bar
