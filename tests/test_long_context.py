"""Long sequences: activation checkpointing and tiling change no loss; Ulysses sequence parallelism
over 2 ranks, and sequence 2 x data 2 over 4, matches one process holding every whole sequence; a
sequence-parallel run resumes exactly after SIGTERM and exports a model with the reference's logits.

Tolerances: recomputing a checkpointed layer repeats the same operations on the same inputs, so
checkpointing on and off agree to 1e-6 (the spec's; measured: bitwise). Tiling splits the MLP's and
the loss's sums into per-tile sums (measured up to 9.5e-7, one float32 ulp at a loss of 8; two ulps,
2e-6, allowed). The sequence layouts use the layout tests' tolerances (tests/layout_checks.py).
"""

import os
import signal

import pytest
from conftest import FAST, pool_main, pool_train, read_metrics, train_on_pool, wait_for_step
from layout_checks import check_against_reference

SEQUENCE = ["parallel.sequence=2"]
TIED = "model.hf_config.tie_word_embeddings=true"


def losses(pool, tmp_path, name: str, overrides: list[str]) -> list[float]:
    return [m["loss"] for m in train_on_pool(pool, [*FAST, *overrides, f"run_dir={tmp_path / name}"])]


def assert_close(got: list[float], expected: list[float], tolerance: float) -> None:
    assert len(got) == len(expected) == 10
    worst = max(abs(a - b) for a, b in zip(got, expected))
    print(f"worst difference over 10 steps: {worst:.1e}")
    assert worst <= tolerance, f"{got}\n{expected}"


@pytest.mark.parametrize("layout", [["zero=stage2"], ["zero=stage3"], ["parallel.pipeline=2", "zero=stage1"]],
                         ids=["zero2", "zero3", "pipeline2"])
def test_activation_checkpointing_changes_no_loss(rank_pool, tmp_path, layout):
    plain = losses(rank_pool, tmp_path, "plain", layout)
    checkpointed = losses(rank_pool, tmp_path, "checkpointed", [*layout, "train.activation_checkpointing=full"])
    assert_close(checkpointed, plain, 1e-6)


@pytest.mark.parametrize("layout", [["zero=stage2"], ["zero=stage1", TIED], ["zero=stage3", TIED]],
                         ids=["zero2", "zero1-tied", "zero3-tied"])
def test_tiled_mlp_and_loss_change_no_loss(rank_pool, tmp_path, layout):
    """With a tied output head (Llama 3.2's small models) the head's weight also gets the embedding's
    gradient after the tiled pieces; ZeRO must reduce the sum once."""
    plain = losses(rank_pool, tmp_path, "plain", layout)
    tiled = losses(rank_pool, tmp_path, "tiled", [*layout, "train.tiled_mlp=4", "train.tiled_loss=4"])
    assert_close(tiled, plain, 2e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_sequence_parallel_on_two_ranks_matches_the_reference(rank_pool, tmp_path, stage):
    """One data-parallel rank whose sequences are split in two: the reference holds each whole
    sequence in one process. The ZeRO-3 run, with checkpointing and tiling on as a long-context run
    would have them, is exported and must give the reference model's logits."""
    run_dir = tmp_path / "run"
    layout = [*SEQUENCE, f"zero=stage{stage}"]
    if stage == 3:
        layout += ["train.activation_checkpointing=full", "train.tiled_mlp=2", "train.tiled_loss=2"]
    rank_pool.run(pool_train, [*FAST, *layout, f"run_dir={run_dir}"])
    check_against_reference(run_dir, layout, dp_size=1, exported=tmp_path / "hf" if stage == 3 else None)


@pytest.mark.parametrize("stage", [2, 3])
def test_sequence_2_by_data_2_on_four_ranks_matches_the_reference(rank_pool4, tmp_path, stage):
    run_dir = tmp_path / "run"
    layout = [*SEQUENCE, f"zero=stage{stage}"]
    rank_pool4.run(pool_train, [*FAST, *layout, f"run_dir={run_dir}"])
    check_against_reference(run_dir, layout, dp_size=2)


def test_sequence_parallel_run_stopped_by_sigterm_resumes_exactly(rank_pool, tmp_path):
    """SIGTERM to the second rank of an SP run: every rank saves and the run ends with exit code 75;
    resumed, its losses equal an uninterrupted run's bit for bit (fp32 on the CPU, same layout,
    restored RNG and data position). The ranks are the pool's: what a launcher adds to the stop (the
    signal reaching a rank, the job's exit code) is test_checkpoint_resume's SIGTERM test."""
    steps = 30
    overrides = [*FAST, *SEQUENCE, "zero=stage2", "scheduler=constant", f"train.max_steps={steps}"]
    full = [m["loss"] for m in train_on_pool(rank_pool, [*overrides, f"run_dir={tmp_path / 'full'}"])]

    run_dir = tmp_path / "run"
    rank_pool.start(pool_main, [*overrides, f"run_dir={run_dir}"])
    wait_for_step(run_dir, 3, rank_pool)
    os.kill(rank_pool.processes[1].pid, signal.SIGTERM)
    exits = rank_pool.collect(timeout_s=120)
    assert [code for code, _ in exits] == [75, 75], exits[0][1][-3000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < steps

    resumed = train_on_pool(rank_pool, [*overrides, f"run_dir={run_dir}"])
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed][stopped_at:] == full[stopped_at:]
