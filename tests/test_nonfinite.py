"""A NaN loss skips the update on every rank (weights unchanged) and is counted; too many in a row
stop the run with exit code 3 and the last good checkpoint intact."""

import torch
from conftest import FAST, read_metrics
from fault_injection import train_with_faults

from bigtrain.components.checkpoint.store import find_problem
from bigtrain.errors import NonFiniteError
from bigtrain.tools.export import fp32_state_dict


# ZeRO-3 in fp32: the stage where DeepSpeed itself would apply a NaN step if bigtrain did not skip it.
def test_nan_loss_on_one_rank_skips_the_update_everywhere(rank_pool, tmp_path):
    run_dir = tmp_path / "run"
    # Checkpoints after steps 1 and 2 (periodic) and 3 (the final save, after the NaN step).
    overrides = [*FAST, "train.max_steps=3", "zero=stage3", "checkpoint.interval=1", "checkpoint.keep=3",
                 f"run_dir={run_dir}"]
    rank_pool.run(train_with_faults, {"nan_steps": [3]}, overrides)
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    assert metrics[2]["skipped"] is False
    assert metrics[3]["skipped"] is True and metrics[3]["loss"] is None and metrics[3]["skipped_steps"] == 1
    ckpt = run_dir / "checkpoints"
    step1, step2, step3 = (fp32_state_dict(ckpt / f"step_{s:08d}") for s in (1, 2, 3))
    assert any(not torch.equal(step1[n], step2[n]) for n in step1), "a healthy step changes weights"
    for name in step2:
        assert torch.equal(step2[name], step3[name]), f"{name} changed in the skipped step"


def stopped_by_nonfinite_steps(overrides: list[str]):
    """On every rank: the run's NonFiniteError as (exit code, message), or None if it finished."""
    try:
        train_with_faults({"nan_steps": [3, 4, 5]}, overrides)
    except NonFiniteError as err:
        return err.exit_code, str(err)
    return None


def test_consecutive_nans_stop_the_run_with_last_checkpoint_intact(rank_pool, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*FAST, "train.max_steps=10", "checkpoint.interval=2", "fault.max_nonfinite_steps=3",
                 f"run_dir={run_dir}"]
    outcomes = rank_pool.run(stopped_by_nonfinite_steps, overrides)
    for exit_code, message in outcomes:  # every rank stops, not only the one that saw the NaN
        assert exit_code == 3
        assert "3 consecutive steps (up to step 5) had a non-finite loss" in message
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert find_problem(run_dir / "checkpoints" / "step_00000002") is None
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    skipped = [m["step"] for m in read_metrics(run_dir) if m["skipped"]]
    assert skipped[:2] == [3, 4]
