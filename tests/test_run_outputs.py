"""What a run leaves behind agrees with its config: one run dir with config.yaml, ds_config.json,
metrics.jsonl, TensorBoard events, train.log and the last `checkpoint.keep` checkpoints; relaunching
the same command continues from the newest checkpoint."""

import json
import shutil

import pytest
import yaml

from bigtrain.config import compose
from bigtrain.config.deepspeed import to_deepspeed_config
from conftest import FAST, read_metrics, run_bigtrain

OVERRIDES = [*FAST, "zero=stage3", "offload=optimizer", "train.max_steps=6", "train.grad_accum=2",
             "logging.interval=2", "checkpoint.interval=2", "checkpoint.keep=2"]
REQUIRED = {"step", "loss", "lr", "tokens_per_s", "step_time_s", "tflops", "mem_gb", "grad_norm"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("outputs")
    run_dir = cwd / "run"
    proc = run_bigtrain("deepspeed", 2, [*OVERRIDES, f"run_dir={run_dir}"], cwd=cwd)
    return cwd, run_dir, proc


@pytest.mark.multiprocess
def test_ds_config_json_is_the_one_derived_from_the_config(finished_run):
    _, run_dir, _ = finished_run
    saved = json.loads((run_dir / "ds_config.json").read_text())
    assert saved == to_deepspeed_config(compose([*OVERRIDES, f"run_dir={run_dir}"]), world_size=2)
    assert saved["train_batch_size"] == 4 * 2 * 2
    assert saved["zero_optimization"]["stage"] == 3
    composed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert composed["zero"]["stage"] == 3 and composed["offload"]["optimizer"] == "cpu"
    assert composed["run_dir"] == str(run_dir)


@pytest.mark.multiprocess
def test_metrics_jsonl_has_one_record_per_logged_step(finished_run):
    _, run_dir, _ = finished_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 4, 6]
    tokens_per_step = 4 * 2 * 2 * 64  # micro-batch x grad_accum x ranks x seq_len
    for m in metrics:
        assert REQUIRED <= m.keys()
        assert m["tokens_per_s"] == pytest.approx(tokens_per_step / m["step_time_s"])
        assert m["tflops"] > 0 and m["mem_gb"] > 0.1
        assert m["grad_norm"] is not None and m["grad_norm"] > 0
    # Linear warm-up over 2 steps, then cosine decay to 0.1 x lr at step 6.
    assert metrics[0]["lr"] == pytest.approx(0.5e-3)
    assert metrics[1]["lr"] == pytest.approx(1e-3)
    assert metrics[-1]["lr"] < metrics[1]["lr"]


@pytest.mark.multiprocess
def test_one_run_dir_with_logs_events_and_last_checkpoints(finished_run):
    cwd, run_dir, proc = finished_run
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    assert {"config.yaml", "ds_config.json", "metrics.jsonl", "train.log", "tensorboard", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # keep=2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # Only rank 0 prints step lines.
    assert proc.stdout.count("step      6/6") == 1


@pytest.mark.multiprocess
def test_relaunch_continues_from_newest_checkpoint(finished_run, tmp_path):
    _, original, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)  # the other tests keep the original as it was
    run_bigtrain("torchrun", 2, [*OVERRIDES, "train.max_steps=8", f"run_dir={run_dir}"], cwd=tmp_path)
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == [1, 2, 4, 6, 7, 8]
    assert "resumed from" in (run_dir / "train.log").read_text()
