"""`bigtrain report` on a real run: a 1200 x 800 PNG with curves drawn on it, a one-page HTML report,
and a summary that agrees with metrics.jsonl."""

import base64
import json
import subprocess

import numpy as np
import pytest
from conftest import BIN, bigtrain_in_process
from PIL import Image
from shared_run import monitored_run, records


@pytest.mark.multiprocess
def test_report_draws_the_curves_and_summarizes_the_run(tmp_path_factory, tmp_path):
    run_dir, _ = monitored_run(tmp_path_factory)
    proc = bigtrain_in_process("report", run_dir, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr

    image = Image.open(tmp_path / "report.png")
    assert image.format == "PNG" and image.size == (1200, 800)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    # Not a blank canvas: the loss curve's blue, the stacked bars' colours and the axes are drawn.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 30).sum() > 200  # matplotlib's tab:blue line

    metrics = records(run_dir)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["tokens_seen"] == 10 * 2 * 4 * 64  # steps x ranks x micro-batch x seq_len
    best = min(metrics, key=lambda m: m["loss"])
    assert summary["best_loss"] == best["loss"] and summary["best_loss_step"] == best["step"]
    assert summary["final_loss"] == metrics[-1]["loss"]
    assert summary["train_time_s"] == metrics[-1]["elapsed_s"]
    assert 0 < summary["mfu"] < 1 and summary["peak_mem_gb"] == max(m["mem_gb"] for m in metrics)
    assert f"best loss      {best['loss']:.4f} at step {best['step']}" in proc.stdout

    page = (tmp_path / "report.html").read_text()
    embedded = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(embedded) == (tmp_path / "report.png").read_bytes()
    assert "tokens seen" in page and "5,120" in page


@pytest.mark.commands
def test_report_of_a_folder_without_metrics_is_refused(tmp_path):
    # the command as a process: the entry point itself (the report test above calls it in-process)
    proc = subprocess.run([str(BIN / "bigtrain"), "report", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "has no metrics.jsonl" in proc.stderr
