"""Damaged or incomplete checkpoints are detected at resume, named in a warning, and skipped in
favour of the previous valid one; keep-last-K never deletes the only valid checkpoint."""

import shutil

import pytest
from conftest import FAST, _pool, pool_train, read_metrics

from bigtrain.components.checkpoint.store import MANIFEST, find_problem, newest_valid, read_manifest

OVERRIDES = [*FAST, "train.max_steps=3", "checkpoint.interval=1", "checkpoint.keep=3", "zero=stage2"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, _pools):
    """A 2-rank run with checkpoints at steps 1, 2 and 3."""
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    _pool(_pools, 2).run(pool_train, [*OVERRIDES, f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture
def checkpoints(saved_run, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(saved_run / "checkpoints", copy)
    return copy


def test_saved_checkpoints_are_sealed_with_a_manifest(saved_run):
    ckpt = saved_run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    for step in (1, 2, 3):
        tag = ckpt / f"step_{step:08d}"
        assert find_problem(tag) is None
        manifest = read_manifest(tag)
        assert manifest["step"] == step and manifest["world_size"] == 2 and manifest["zero_stage"] == 2
        names = set(manifest["files"])
        assert {"rng_rank_00000.pt", "rng_rank_00001.pt", "mp_rank_00_model_states.pt"} <= names
        assert sum("optim_states" in n for n in names) == 2  # one ZeRO shard per rank


def shard(tag_dir):
    return next(p for p in sorted(tag_dir.iterdir()) if "optim_states" in p.name)


def truncate(tag_dir):
    path = shard(tag_dir)
    path.write_bytes(path.read_bytes()[:100])
    return path.name


def delete(tag_dir):
    path = shard(tag_dir)
    path.unlink()
    return path.name


def drop_manifest(tag_dir):
    (tag_dir / MANIFEST).unlink()
    return MANIFEST


def flip_a_byte(tag_dir):
    path = tag_dir / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.name


@pytest.mark.parametrize("damage", [truncate, delete, drop_manifest, flip_a_byte])
def test_damaged_newest_falls_back_to_previous(checkpoints, damage):
    bad_file = damage(checkpoints / "step_00000003")
    chosen, warnings = newest_valid(checkpoints)
    assert chosen.name == "step_00000002"
    assert len(warnings) == 1 and bad_file in warnings[0] and "step_00000003" in warnings[0]


def test_half_written_newest_is_skipped(checkpoints):
    partial = checkpoints / "step_00000004"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
    chosen, warnings = newest_valid(checkpoints)
    assert chosen.name == "step_00000003"
    assert "step_00000004" in warnings[0] and MANIFEST in warnings[0]


def test_relaunch_after_damage_resumes_from_previous_and_says_why(saved_run, rank_pool, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    bad_file = truncate(run_dir / "checkpoints" / "step_00000003")
    rank_pool.run(pool_train, [*OVERRIDES, "train.max_steps=4", f"run_dir={run_dir}"])
    log = (run_dir / "train.log").read_text()
    assert "step_00000003 is damaged" in log and bad_file in log
    assert "resumed from" in log and "at step 2" in log
    assert [m["step"] for m in read_metrics(run_dir)][-2:] == [3, 4]
    assert find_problem(run_dir / "checkpoints" / "step_00000004") is None


def test_keep_last_k_spares_the_only_valid_and_in_progress_checkpoints(tmp_path):
    from bigtrain.components.checkpoint.checkpointer import Checkpointer
    from bigtrain.config import compose
    from bigtrain.distributed.topology import ProcessGrid

    ckpt = tmp_path / "checkpoints"
    for step, complete in ((1, False), (2, True), (3, True), (4, False)):
        tag = ckpt / f"step_{step:08d}"
        tag.mkdir(parents=True)
        if complete:
            (tag / MANIFEST).write_text("{}")
    cfg = compose([f"checkpoint.dir={ckpt}", "checkpoint.keep=1"])
    checkpointer = Checkpointer(cfg, 0, ProcessGrid(data=1, pipeline=1, tensor=1))
    checkpointer._prune(keep_always=ckpt / "step_00000003")
    # step 4 may still be being written; step 3 is the newest complete one; 1 and 2 are older.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000003", "step_00000004"]

    checkpointer._prune(keep_always=ckpt / "step_00000003")  # the only valid one is never removed
    assert (ckpt / "step_00000003").is_dir()
