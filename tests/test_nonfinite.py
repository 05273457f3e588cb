"""A NaN loss skips the update on every rank (weights unchanged) and is counted; too many in a row
stop the run with exit code 3 and the last good checkpoint intact."""

import pytest
import torch
from conftest import FAST, launcher_command, read_metrics, run_bigtrain, run_command

from bigtrain.components.checkpoint.store import find_problem
from bigtrain.tools.export import fp32_state_dict


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [3])  # ZeRO-3 in fp32: DeepSpeed itself would apply a NaN step
def test_nan_loss_on_one_rank_skips_the_update_everywhere(tmp_path, stage):
    run_dir = tmp_path / "run"
    # Checkpoints after steps 1 and 2 (periodic) and 3 (the final save, after the NaN step).
    run_bigtrain("torchrun", 2, [*FAST, "train.max_steps=3", f"zero=stage{stage}", "checkpoint.interval=1",
                                 "checkpoint.keep=3", f"run_dir={run_dir}"],
                 cwd=tmp_path, faults=["--nan-steps", "3"])
    metrics = {m["step"]: m for m in read_metrics(run_dir)}
    assert metrics[2]["skipped"] is False
    assert metrics[3]["skipped"] is True and metrics[3]["loss"] is None and metrics[3]["skipped_steps"] == 1
    ckpt = run_dir / "checkpoints"
    step1, step2, step3 = (fp32_state_dict(ckpt / f"step_{s:08d}") for s in (1, 2, 3))
    assert any(not torch.equal(step1[n], step2[n]) for n in step1), "a healthy step changes weights"
    for name in step2:
        assert torch.equal(step2[name], step3[name]), f"{name} changed in the skipped step"


@pytest.mark.multiprocess
def test_consecutive_nans_stop_the_run_with_last_checkpoint_intact(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*FAST, "train.max_steps=10", "checkpoint.interval=2", "fault.max_nonfinite_steps=3",
                 f"run_dir={run_dir}"]
    proc = run_command(launcher_command("deepspeed", 2, overrides, faults=["--nan-steps", "3,4,5"]), tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "3 consecutive steps (up to step 5) had a non-finite loss" in log
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert find_problem(run_dir / "checkpoints" / "step_00000002") is None
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
