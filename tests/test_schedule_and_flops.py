"""Learning-rate schedule, FLOP accounting, and the default run directory."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bigtrain.components.lr_schedule import lr_ratio
from bigtrain.components.models import build_model, matmul_parameters
from bigtrain.config import compose
from bigtrain.config.compose import default_run_dir
from bigtrain.monitor.metrics import flops_per_token


def test_linear_warmup_then_cosine_to_floor():
    ratios = [lr_ratio(s, warmup_steps=4, max_steps=14, min_ratio=0.1) for s in range(16)]
    assert ratios[:4] == [0.25, 0.5, 0.75, 1.0]  # the first step already learns
    assert ratios[4] == 1.0
    assert ratios[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert ratios[14] == pytest.approx(0.1) and ratios[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratios[4:], ratios[5:]))


def test_no_warmup_starts_at_peak():
    assert lr_ratio(0, warmup_steps=0, max_steps=10, min_ratio=1.0) == 1.0


def test_matmul_parameters_skip_lookups_and_count_tied_head_once():
    llama = build_model(compose([]).model, seed=0)  # untied: embedding table is a pure lookup
    total = sum(p.numel() for p in llama.parameters())
    embed = llama.get_input_embeddings().weight.numel()
    assert matmul_parameters(llama) == total - embed

    gpt2 = build_model(compose(["model=tiny_gpt2"]).model, seed=0)  # tied head, learned positions
    total = sum(p.numel() for p in gpt2.parameters())
    positions = gpt2.transformer.wpe.weight.numel()
    assert matmul_parameters(gpt2) == total - positions


def test_flops_formula_matches_palm():
    # 6N + 12 L d T, e.g. N=1e9, L=16, d=2048, T=2048.
    assert flops_per_token(10**9, 16, 2048, 2048) == 6e9 + 12 * 16 * 2048 * 2048


def test_default_run_dir_is_the_same_for_the_same_command():
    a = default_run_dir(["zero=stage3", "train.max_steps=20"])
    b = default_run_dir(["train.max_steps=20", "zero=stage3"])
    assert a == b == "runs/train.max_steps=20,zero=stage3"
    assert default_run_dir([]) == "runs/default"
    assert len(default_run_dir([f"+model.hf_config.k{i}={i}" for i in range(40)]).split("/")[1]) <= 80


def test_realistic_model_configs_compose():
    for name, billions in (("llama_1b", 1.0), ("gpt2_small", 0.1)):
        cfg = compose([f"model={name}"])
        config = AutoConfig.for_model(cfg.model.family, **cfg.model.hf_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        assert billions <= params / 1e9 < billions * 1.5, (name, params)
