"""Held-out evaluation: on 2 ranks at ZeRO-2, ZeRO-3 and pipeline=2 it equals a single-process plain
PyTorch evaluation of the same weights on the same samples, and it does not change training.

Tolerance 1e-5 on the loss (about 7): the same fp32 weights and samples, the sums only taken in another
order (per rank, then all-reduced)."""

import math

import pytest
import torch
from conftest import FAST, pool_train, train_on_pool
from reference import token_loss_sum

from bigtrain.components.data.loader import BatchLoader, BatchPlan
from bigtrain.components.data.sources import evaluation_sources, open_samples
from bigtrain.components.models import build_model_config
from bigtrain.config import compose
from bigtrain.monitor.progress import format_step_line
from bigtrain.tools.export import fp32_state_dict
from bigtrain.tools.report import plot, summarize

EVAL = ["eval.interval=5", "eval.batches=3"]


def reference_evaluation(overrides: list[str], checkpoint, dp_size: int) -> float:
    """Mean token loss of the run's evaluation samples under the checkpoint's weights, in one process."""
    from transformers import AutoModelForCausalLM

    cfg = compose(overrides)
    model = AutoModelForCausalLM.from_config(build_model_config(cfg.model), dtype=torch.float32).eval()
    missing, _ = model.load_state_dict(fp32_state_dict(checkpoint, model), strict=False)
    assert not [m for m in missing if "lm_head" not in m]
    sources = evaluation_sources(cfg)
    plan = BatchPlan(micro_batch_size=cfg.train.micro_batch_size * dp_size, grad_accum=1, dp_size=1, dp_rank=0)
    loader = BatchLoader(open_samples(cfg, sources, "validation"), [s.weight for s in sources], plan, cfg.seed,
                         allow_repeats=True)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in range(cfg.eval.batches):
            loss, count = token_loss_sum(model, loader.micro_batch(b, 0))
            total, tokens = total + loss.item(), tokens + count
    return total / tokens


@pytest.mark.parametrize("layout,dp_size", [
    (["zero=stage2"], 2), (["zero=stage3"], 2), (["zero=stage1", "parallel.pipeline=2", "train.grad_accum=2"], 1),
], ids=["zero2", "zero3", "pipeline2"])
def test_evaluation_equals_a_single_process_evaluation_of_the_same_weights(rank_pool, tmp_path, layout, dp_size):
    overrides = [*FAST, *layout, *EVAL, f"run_dir={tmp_path / 'run'}"]
    result = rank_pool.run(pool_train, overrides)[0]
    evaluated = [r for r in result["metrics"] if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [5, 10]  # every eval.interval steps, and at the end
    final = evaluated[-1]
    expected = reference_evaluation(overrides, tmp_path / "run" / "checkpoints" / "step_00000010", dp_size)
    print(f"val_loss {final['val_loss']:.7f} reference {expected:.7f}")
    assert abs(final["val_loss"] - expected) <= 1e-5
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert evaluated[-1]["val_loss"] < evaluated[0]["val_loss"] + 0.5  # it trained; held-out loss follows


def test_evaluation_does_not_change_training(rank_pool, tmp_path):
    with_eval = train_on_pool(rank_pool, [*FAST, "eval.interval=2", "eval.batches=2", f"run_dir={tmp_path / 'on'}"])
    without = train_on_pool(rank_pool, [*FAST, "eval.interval=0", f"run_dir={tmp_path / 'off'}"])
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]  # bitwise
    assert sum("val_loss" in r for r in with_eval) == 5 and not any("val_loss" in r for r in without)

    # Where a user looks: the step line (train.log and stdout) and `bigtrain report`'s summary and chart.
    log = (tmp_path / "on" / "train.log").read_text()
    final = with_eval[-1]
    shown = f"val_loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.1f})"
    assert f"step 10: {shown}" in log and log.count("val_loss") == 5
    assert shown in format_step_line(final, 10)
    summary = summarize(with_eval)
    best = min((r["val_loss"], r["step"]) for r in with_eval if "val_loss" in r)
    assert (summary.final_val_loss, (summary.best_val_loss, summary.best_val_loss_step)) == (final["val_loss"], best)
    assert ("final val_loss", f"{final['val_loss']:.4f}") in summary.rows()
    assert plot(with_eval, "run", tmp_path / "curves.png").stat().st_size > 10_000
