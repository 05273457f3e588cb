"""Pipeline and tensor parallelism on HF models: runs follow the single-process reference step for
step, resume exactly, export to a plain HF model, and count the whole model once in their metrics.
Tolerances: tests/layout_checks.py.
"""

import pytest
from conftest import FAST, pool_train, read_metrics
from layout_checks import GPT2, STEPS, check_against_reference


def test_pipeline_llama_matches_reference_resumes_exactly_and_exports(rank_pool, rank_pool1, tmp_path):
    """PP=2 on the debug Llama (untied head); a second run resumed from the step-5 checkpoint of the
    first reproduces its steps 6-10 bit for bit (same ranks, restored RNG and data position)."""
    run_dir = tmp_path / "run"
    layout = ["parallel.pipeline=2", "zero=stage1"]
    rank_pool.run(pool_train, [*FAST, *layout, "checkpoint.interval=5", f"run_dir={run_dir}"])
    assert (run_dir / "checkpoints" / "step_00000005" / "layer_00-model_states.pt").is_file()
    check_against_reference(run_dir, layout, dp_size=1, exported=tmp_path / "hf")

    resumed = tmp_path / "resumed"
    rank_pool.run(pool_train, [*FAST, *layout, f"checkpoint.resume={run_dir}/checkpoints/step_00000005",
                               f"run_dir={resumed}"])
    assert [m["step"] for m in read_metrics(resumed)] == list(range(6, STEPS + 1))
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(run_dir)][5:]

    # Another layout cannot load per-stage files: refused with the layout to use, nothing trained.
    with pytest.raises(Exception) as refused:
        rank_pool1.run(pool_train, [*FAST, f"run_dir={run_dir}", "zero=stage1"])
    assert "was saved with data 1 x pipeline 2 x tensor 1, this run has data 1 x pipeline 1" in str(refused.value)
    assert "parallel.pipeline=2 parallel.tensor=1" in str(refused.value)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))


def test_pipeline_gpt2_with_tied_embeddings_matches_reference_and_exports(rank_pool, tmp_path):
    """GPT-2's output head is its token embedding: the first and last stage each hold a copy, kept
    equal by summing their gradients. Export writes it once, as the tied HF weight."""
    run_dir = tmp_path / "run"
    layout = ["parallel.pipeline=2", "zero=stage1", *GPT2]
    rank_pool.run(pool_train, [*FAST, *layout, f"run_dir={run_dir}"])
    check_against_reference(run_dir, layout, dp_size=1, exported=tmp_path / "hf")


def test_tensor_parallel_llama_matches_reference_and_exports(rank_pool, tmp_path):
    """TP=2 (AutoTP); export merges the two ranks' slices of every sharded weight."""
    run_dir = tmp_path / "run"
    layout = ["parallel.tensor=2", "zero=stage1"]
    rank_pool.run(pool_train, [*FAST, *layout, f"run_dir={run_dir}"])
    check_against_reference(run_dir, layout, dp_size=1, exported=tmp_path / "hf")


@pytest.mark.parametrize("layout", [["parallel.pipeline=2", "zero=stage1"], ["parallel.tensor=2", "zero=stage1"]],
                         ids=["pipeline2-x-data2", "tensor2-x-data2"])
def test_four_ranks_with_data_parallelism(rank_pool4, tmp_path, layout):
    """2 model-parallel ranks x 2 data-parallel groups: each group reads its half of every batch."""
    run_dir = tmp_path / "run"
    rank_pool4.run(pool_train, [*FAST, *layout, f"run_dir={run_dir}"])
    check_against_reference(run_dir, layout, dp_size=2)
