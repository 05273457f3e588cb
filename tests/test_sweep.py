"""`bigtrain sweep`: a 2-point grid (Hydra's basic sweeper) and a 2-trial Bayesian search (Optuna's TPE
through hydra-optuna-sweeper), each trial a real one-rank training run whose final loss reaches the
sweeper."""

import json
import subprocess

import pytest
import yaml
from conftest import BIN, FAST

# FAST's learning rate left out: the sweeps set it.
TRIAL = [*(o for o in FAST if not o.startswith("optimizer.lr=")), "train.max_steps=4", "logging.interval=2", "checkpoint.save_final=false", "logging.progress=false"]


def sweep(args: list[str], cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "bigtrain"), "sweep", *args, *TRIAL], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def trial_results(sweep_dir) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]


def last_loss(run_dir) -> float:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return json.loads(f.read().splitlines()[-1])["loss"]


@pytest.mark.multiprocess
def test_grid_multirun_trains_every_point(tmp_path):
    sweep(["optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path / 'grid'}"], cwd=tmp_path)
    results = trial_results(tmp_path / "grid")
    assert [r["trial"] for r in results] == [0, 1]
    lrs = []
    for r in results:
        assert r["run_dir"] == str(tmp_path / "grid" / str(r["trial"]))
        assert r["loss"] == last_loss(r["run_dir"]) and r["exit_code"] == 0
        lrs.append(yaml.safe_load(open(f"{r['run_dir']}/config.yaml"))["optimizer"]["lr"])
    assert lrs == [1e-3, 3e-3]
    assert results[0]["loss"] != results[1]["loss"]  # different learning rates, different runs


@pytest.mark.multiprocess
def test_optuna_search_gets_each_trials_final_loss(tmp_path):
    proc = sweep(["hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1",
                  "optimizer.lr=interval(1e-4,1e-2)", f"hydra.sweep.dir={tmp_path / 'optuna'}"], cwd=tmp_path)
    results = trial_results(tmp_path / "optuna")
    assert len(results) == 2
    for r in results:
        assert r["loss"] == last_loss(r["run_dir"])
        lr = yaml.safe_load(open(f"{r['run_dir']}/config.yaml"))["optimizer"]["lr"]
        assert 1e-4 <= lr <= 1e-2 and f"optimizer.lr={lr}" in r["overrides"]
    best = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    winner = min(results, key=lambda r: r["loss"])
    assert best["best_value"] == winner["loss"]  # the sweeper received the runs' losses
    assert f"optimizer.lr={best['best_params']['optimizer.lr']}" in winner["overrides"]
    assert "Best value" in proc.stderr + proc.stdout
