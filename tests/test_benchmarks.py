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
