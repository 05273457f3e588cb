"""A checkpoint folder that cannot be written is refused at start-up; a disk that fills up during
a save gives a clear error (exit 4) and leaves the previous checkpoint valid."""

import subprocess

import pytest
from conftest import FAST, TINY_LLAMA, pool_main

from bigtrain.components.checkpoint.store import find_problem, list_tags


def test_unwritable_checkpoint_dir_is_refused_before_training(rank_pool1, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run_dir = tmp_path / "run"
    [(code, stderr)] = rank_pool1.run(pool_main, [*FAST, f"checkpoint.dir={blocker}/checkpoints",
                                                  f"run_dir={run_dir}"])
    assert code == 2
    assert f"checkpoint.dir {blocker}/checkpoints is not writable" in stderr  # before anything is written
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 120 MB tmpfs: room for one checkpoint of the tiny model (~85 MB), not two."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_during_save_keeps_previous_checkpoint(rank_pool, tmp_path, small_disk):
    run_dir = tmp_path / "run"
    ckpt = small_disk / "checkpoints"
    exits = rank_pool.run(pool_main, [*FAST, *TINY_LLAMA, "train.max_steps=3", "checkpoint.interval=1", "checkpoint.keep=2",
                                      f"checkpoint.dir={ckpt}", f"run_dir={run_dir}"])
    assert [code for code, _ in exits] == [4, 4], exits[0][1][-3000:]  # every rank stops with the save's code
    log = (run_dir / "train.log").read_text()
    assert "Could not save checkpoint" in log and "the disk holding it is full" in log
    assert f"The previous checkpoint {ckpt}/step_00000001 is intact" in log
    assert [p.name for p in list_tags(ckpt)] == ["step_00000001"]  # the partial save was removed
    assert find_problem(ckpt / "step_00000001") is None
    assert (ckpt / "latest").read_text() == "step_00000001"
