"""The benchmark code paths run end to end (on a tiny model), so they cannot rot unnoticed."""

import pytest

from benchmarks.throughput import _markdown as throughput_markdown
from benchmarks.throughput import main as throughput
from benchmarks.throughput import zero_model_state_gb


def test_zero_formula():
    # 1M parameters, fp32 Adam over 4 ranks: ZeRO-0 16 bytes each (weights, gradients, moments);
    # above it a 12-byte master copy + moments split 4 ways, then the gradients, then the weights.
    assert zero_model_state_gb(10**6, 0, 4) == pytest.approx(0.016)
    assert zero_model_state_gb(10**6, 1, 4) == pytest.approx(0.011)
    assert zero_model_state_gb(10**6, 2, 4) == pytest.approx(0.008)
    assert zero_model_state_gb(10**6, 3, 4) == pytest.approx(0.005)


@pytest.mark.multiprocess
def test_throughput_benchmark_quick(tmp_path):
    result = throughput(["--quick", "--out", str(tmp_path)])
    for way in ("bigtrain", "raw_deepspeed", "plain_pytorch"):
        row = result["comparison"][way]
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and 0 < row["mfu"] < 1
    assert result["peak_tflops"] > 0
    assert set(result["ratios"]) == {"bigtrain / raw DeepSpeed", "bigtrain / plain PyTorch"}
    assert result["comparison"]["bigtrain"]["time_to_first_step_s"] > 0
    assert 0 < result["profile"]["matmul_share"] < 1 and result["profile"]["top_ops"]
    assert len(result["targets"]) == 3 and all(isinstance(t["met"], bool) for t in result["targets"])
    markdown = throughput_markdown(result)
    assert "| bigtrain |" in markdown and "bigtrain / raw DeepSpeed" in markdown and "torch.profiler" in markdown


def test_largest_model_parameter_count():
    """The search sizes its models by this count; it must be the count transformers builds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.largest_model import llama_params

    for layers in (1, 3):
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                             tie_word_embeddings=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert llama_params(layers) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ long context


def test_long_context_setups_add_one_lever_each():
    from benchmarks.long_context import SETUPS, setup_overrides

    assert setup_overrides(SETUPS[0], 2048, 512) == []
    assert setup_overrides(SETUPS[1], 2048, 512) == ["train.activation_checkpointing=full"]
    assert setup_overrides(SETUPS[2], 2048, 512) == ["train.activation_checkpointing=full", "parallel.sequence=2"]
    # a rank holds 1024 of the 2048 tokens: 2 pieces of 512; never fewer than 2
    assert setup_overrides(SETUPS[3], 2048, 512)[2:] == ["train.tiled_mlp=2", "train.tiled_loss=2"]
    assert setup_overrides(SETUPS[3], 256, 512)[2:] == ["train.tiled_mlp=2", "train.tiled_loss=2"]
    # one rank (a single GPU): no sequence parallelism, the whole sequence tiled
    assert setup_overrides(SETUPS[3], 2048, 512, sequence=1) == [
        "train.activation_checkpointing=full", "train.tiled_mlp=4", "train.tiled_loss=4"]


def _fake_trials(limit_gb: float, per_token_gb: float, fixed_gb: float = 1.0, step_s=lambda n: 1.0):
    """A trial function for the search: memory grows linearly with the length, time passes on a fake clock."""
    now = [0.0]
    tried = []

    def trial(length: int, seconds_left: float) -> dict:
        tried.append(length)
        memory = fixed_gb + per_token_gb * length
        now[0] += 10 + 3 * step_s(length)
        if memory > limit_gb:
            return {"seq_len": length, "status": "memory"}
        return {"seq_len": length, "status": "ok", "memory_gb": memory, "startup_s": 10.0,
                "step_time_s": step_s(length)}

    return trial, tried, lambda: now[0]


def test_long_context_search_brackets_the_limit():
    from benchmarks.long_context import search

    limit, per_token = 20.0, 0.001  # fits up to 19,000 tokens
    trial, tried, clock = _fake_trials(limit, per_token)
    first = trial(2048, 1e9)
    found = search(trial, first, granularity=512, max_len=1 << 20, deadline=1e9, limit_gb=limit, clock=clock)
    assert found["longest"] <= 19_000 < found["first_failing"] and found["first_failing"] - found["longest"] <= 512
    assert found["stopped"] is None
    assert tried[:5] == [2048, 4096, 8192, 16384, 32768]  # doubling until a run fails
    assert len(tried) <= 8  # the memory line finds the limit in a step or two, not log2(16384 / 512) = 5
    assert found["predicted_by_memory"] == pytest.approx(19_000)


def test_long_context_search_stops_at_its_time_budget():
    from benchmarks.long_context import search

    # every step takes (length / 1000)^2 seconds: 4096 tokens ~ 50 s for 3 steps, 8192 ~ 200 s
    trial, tried, clock = _fake_trials(1e9, 1e-6, step_s=lambda n: (n / 1000) ** 2)
    first = trial(2048, 1e9)
    found = search(trial, first, granularity=512, max_len=1 << 20, deadline=150.0, limit_gb=1e9, clock=clock)
    assert found["stopped"] == "time" and found["first_failing"] is None
    assert found["longest"] == 4096 and tried == [2048, 4096]  # 8192 would not have finished in time

    # a run the memory line says will not fit is started anyway: it fails within its first step
    trial, tried, clock = _fake_trials(7.0, 1e-3, step_s=lambda n: (n / 1000) ** 2)  # fits up to 6,000 tokens
    first = trial(2048, 1e9)
    found = search(trial, first, granularity=512, max_len=1 << 20, deadline=150.0, limit_gb=7.0, clock=clock)
    assert tried == [2048, 4096, 8192] and found["stopped"] == "time"
    assert (found["longest"], found["first_failing"]) == (4096, 8192)

    failed = {"seq_len": 2048, "status": "memory"}
    assert search(trial, failed, granularity=512, max_len=1 << 20, deadline=1e9, limit_gb=1.0,
                  clock=clock)["longest"] is None


@pytest.mark.multiprocess
def test_long_context_benchmark_quick(tmp_path):
    from benchmarks.long_context import SETUPS, _markdown
    from benchmarks.long_context import main as long_context

    result = long_context(["--quick", "--out", str(tmp_path)])
    assert list(result["setups"]) == [SETUPS[3]]  # every lever at once
    fixed = result["setups"][SETUPS[3]]["fixed"]
    assert fixed["status"] == "ok", fixed
    assert fixed["tokens_per_s"] > 0 and len(fixed["peak_rss_gb"]) == 2 and min(fixed["peak_rss_gb"]) > 0
    assert fixed["tokens_per_step"] == 256  # one sequence a step, split over the two ranks
    markdown = _markdown(result)
    assert "| + tiled MLP and loss |" in markdown and "parallel.sequence=2 train.tiled_mlp=2 train.tiled_loss=2" in markdown
    assert not list(tmp_path.iterdir())  # --quick writes no result files


# -------------------------------------------------------------------------------------- data scale


def test_data_scale_corpus_is_deterministic(tmp_path):
    from benchmarks.data_scale import generate_corpus

    a, b, c = (tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl"))
    made = generate_corpus(a, 200_000, seed=3)
    generate_corpus(b, 200_000, seed=3)
    generate_corpus(c, 200_000, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert made["bytes"] >= 200_000 and made["documents"] >= 1 and made["distinct_words"] > 10_000
