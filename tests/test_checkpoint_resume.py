"""Resume continues exactly: bitwise on the same ranks, after SIGTERM, after kill -9 of a rank, and
on a different number of data-parallel ranks (through DeepSpeed's universal checkpoint format); the
SIGTERM and rank-count cases train on a weighted blend of two prepared sources, whose order must
survive the restart too."""

import os
import signal
import time

import psutil
import pytest
from conftest import (
    FAST,
    REPO,
    launcher_command,
    pool_train,
    rank_pids,
    read_metrics,
    wait_for_step,
)
from reference import reference_losses

from bigtrain.components.checkpoint.store import find_problem
from bigtrain.config import compose

# A schedule that does not depend on max_steps, so a short first leg trains like a long run.
BASE = [*FAST, "scheduler=constant", "scheduler.warmup_steps=2"]


@pytest.mark.multiprocess
def test_sigterm_saves_exits_75_and_resume_is_bitwise_identical(tmp_path, background, rank_pool, blended_data):
    """SIGTERM to one rank (not rank 0) of a launched job mid-run: every rank saves, the job exits
    75; the relaunch continues at the next step, and its losses and its samples drawn from each
    source equal an uninterrupted run's exactly (fp32 on the CPU, same ranks, same data, restored
    RNG: no tolerance needed)."""
    steps = 30
    full = tmp_path / "full"
    rank_pool.run(pool_train, [*BASE, *blended_data, f"train.max_steps={steps}", f"run_dir={full}"])

    run_dir = tmp_path / "run"
    overrides = [*BASE, *blended_data, f"train.max_steps={steps}", f"run_dir={run_dir}"]
    proc = background(launcher_command("deepspeed", 2, overrides), tmp_path, tmp_path / "log.txt")
    wait_for_step(run_dir, 3, proc)
    os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, (tmp_path / "log.txt").read_text()[-3000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < steps
    tag_dir = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert find_problem(tag_dir) is None
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_dir.name

    rank_pool.run(pool_train, overrides)
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    expected = read_metrics(full)
    assert [m["loss"] for m in resumed][stopped_at:] == [m["loss"] for m in expected][stopped_at:]  # bitwise
    assert resumed[-1]["samples_by_source"] == expected[-1]["samples_by_source"]


@pytest.mark.multiprocess
def test_kill_9_of_a_rank_ends_the_job_and_restart_wrapper_resumes(tmp_path, background):
    """Bound: the launcher ends the job within 60 s of the kill (seen: about 3 s, as the surviving
    rank's next collective fails at once with 'Connection closed by peer'). launchers/restart.sh
    then relaunches it, and the relaunch loses at most one checkpoint interval."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "log.txt"
    command = launcher_command("torchrun", 2, [*BASE, "train.max_steps=14", "checkpoint.interval=2",
                                               f"run_dir={run_dir}"])
    wrapper = background([str(REPO / "launchers" / "restart.sh"), *command], tmp_path, log_path,
                         MAX_RESTARTS="1", RESTART_DELAY_S="0")
    kill_step = 3 + int.from_bytes(os.urandom(1), "little") % 4
    print(f"killing rank 1 at step {kill_step} or just after")
    wait_for_step(run_dir, kill_step, wrapper)
    killed_at = read_metrics(run_dir)[-1]["step"]
    launcher = next(p for p in psutil.Process(wrapper.pid).children(recursive=True)
                    if "torchrun" in " ".join(p.cmdline()))
    os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
    start = time.monotonic()
    while "restart.sh: exit code" not in log_path.read_text():
        assert time.monotonic() - start < 60, "the job did not end within 60 s of kill -9"
        time.sleep(0.2)
    print(f"job ended {time.monotonic() - start:.1f} s after kill -9 of rank 1 at step {killed_at}")

    assert wrapper.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    # The surviving rank saw its peer vanish mid-collective and said so (and exited with code 5).
    assert "a collective failed" in (run_dir / "train.log").read_text()
    train_log = (run_dir / "train.log").read_text()
    resumed_at = int(train_log.split("resumed from")[-1].split("at step ")[1].split()[0])
    assert killed_at - resumed_at <= 2 + 1  # one interval, plus the step in flight at the kill
    assert read_metrics(run_dir)[-1]["step"] == 14


# ZeRO-1 and -2 share DeepSpeed's optimizer (stage_1_and_2.py) and its universal-checkpoint loader;
# ZeRO-3 has its own.
@pytest.mark.parametrize("stage", [1, 3])
def test_resume_on_another_number_of_ranks(rank_pool1, rank_pool, tmp_path, stage, blended_data):
    """1 rank (2 micro-batches accumulated) for 3 steps, 2 ranks (same global batch) to step 5, then
    1 rank again to step 7, on blended data. Every step matches the single-process reference within
    1e-4, the parity tolerance (tests/test_parity.py): the universal conversion is exact, so the only
    differences are the same reduction-order ones."""
    run_dir = tmp_path / "run"
    common = [*BASE, *blended_data, f"zero=stage{stage}", f"run_dir={run_dir}"]
    rank_pool1.run(pool_train, [*common, "train.max_steps=3", "train.grad_accum=2"])
    rank_pool.run(pool_train, [*common, "train.max_steps=5"])
    rank_pool1.run(pool_train, [*common, "train.max_steps=7", "train.grad_accum=2"])

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 8))
    expected = reference_losses(compose([*BASE, *blended_data]), dp_size=2, steps=7)
    worst = max(abs(m["loss"] - e) for m, e in zip(metrics, expected))
    assert worst <= 1e-4, ([m["loss"] for m in metrics], expected)
    log = (run_dir / "train.log").read_text()
    assert log.count("converting it to DeepSpeed's universal format") == 2
    assert log.count("(through the universal format)") == 2
