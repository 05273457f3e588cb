"""Bad configs are refused at composition with one clear message, exit code 2, and no heavy work:
no process group, no DeepSpeed import, no run directory."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest

from bigtrain.config import compose
from bigtrain.config.machine import cpu_has_bf16_units
from bigtrain.config.validate import validate
from bigtrain.errors import ConfigError

# name: (overrides, world size, words the message must contain)
BAD_CONFIGS = {
    "offload_full_without_stage3": (["offload=full", "zero=stage2"], 1, "only ZeRO stage 3 can do"),
    "nvme_optimizer_below_stage3": (["offload=nvme_optimizer", "offload.nvme_path=/tmp", "zero=stage2"], 1, "DeepSpeed does only at ZeRO stage 3"),
    "offload_optimizer_with_stage0": (["offload=optimizer", "zero=stage0"], 1, "zero=stage0"),
    "batch_arithmetic": (
        ["train.global_batch_size=20", "train.micro_batch_size=8"], 2,
        "train.global_batch_size=20 cannot hold with 2 data-parallel ranks",
    ),
    "unknown_model": (["model=llama_9000"], 1, "Unknown model option 'llama_9000' (from 'model=llama_9000'). Choose one of: gpt2_small, llama_1b, tiny_gpt2, tiny_llama"),
    "unknown_group_option": (["zero=stage9"], 1, "Unknown zero option 'stage9'"),
    "unknown_key": (["train.max_stepz=5"], 1, "Unknown config key 'train.max_stepz'"),
    "bad_value_type": (["train.max_steps=many"], 1, "Value 'many' of type 'str' could not be converted"),
    "missing_data_path": (["data=hf", "data.files=[/no/such/corpus.txt]"], 1, "'/no/such/corpus.txt' (data.files) does not exist"),
    "data_files_not_given": (["data=hf"], 1, "data.builder=text reads local files, but data.files is empty"),
    "missing_tokenizer": (["data.tokenizer=/no/tokenizer"], 1, "Tokenizer folder '/no/tokenizer'"),
    "seq_len_above_max_positions": (["train.seq_len=1024"], 1, "train.seq_len=1024 is longer than model tiny_llama supports (512 positions)"),
    "tokenizer_larger_than_vocab": (["model.hf_config.vocab_size=1000"], 1, "has 4096 tokens but model tiny_llama has only vocab_size=1000"),
    "zero_micro_batch": (["train.micro_batch_size=0"], 1, "train.micro_batch_size must be positive, got 0"),
    "negative_steps": (["train.max_steps=-5"], 1, "train.max_steps must be positive, got -5"),
    "zero_seq_len": (["train.seq_len=0"], 1, "train.seq_len must be positive, got 0"),
    "zero_grad_accum": (["train.grad_accum=0"], 1, "train.grad_accum must be positive, got 0"),
    "fp16_on_cpu": (["precision=fp16", "train.device=cpu"], 1, "precision=fp16 needs a GPU"),
    "world_not_divisible_by_layout": (["parallel.pipeline=2", "zero=stage1"], 3, "3 processes cannot be split into pipeline=2 x tensor=1"),
    "pipeline_with_tensor": (["parallel.pipeline=2", "parallel.tensor=2", "zero=stage1"], 4, "cannot be nested inside pipeline stages"),
    "pipeline_with_zero2": (["parallel.pipeline=2", "zero=stage2"], 2, "zero=stage2: ZeRO-2 and ZeRO-3 partition gradients"),
    "pipeline_with_zero3": (["parallel.pipeline=2", "zero=stage3"], 2, "zero=stage3: ZeRO-2 and ZeRO-3 partition gradients"),
    "pipeline_zero0_clipping": (["parallel.pipeline=2", "zero=stage0"], 2, "clips each pipeline stage by its own gradient norm"),
    "pipeline_deeper_than_model": (["parallel.pipeline=8", "zero=stage1"], 8, "need at least 8 decoder layers, but model tiny_llama has 4"),
    "pipeline_unknown_partition": (["parallel.pipeline=2", "zero=stage1", "parallel.pipeline_partition=balanced"], 2, "'balanced' is not a partition method"),
    "pipeline_partition_matches_nothing": (["parallel.pipeline=2", "zero=stage1", "parallel.pipeline_partition=type:Conv"], 2, "matches 0 layer(s) of model tiny_llama"),
    "pipeline_unsupported_family": (["parallel.pipeline=2", "zero=stage1", "model.family=opt"], 2, "model.family='opt' is not one of them"),
    "checkpointing_interval_without_pipeline": (["parallel.activation_checkpoint_interval=1"], 1, "applies to pipeline stages, but parallel.pipeline=1"),
    "tensor_not_dividing_heads": (["parallel.tensor=3"], 3, "parallel.tensor=3 must divide the model's num_attention_heads"),
    "tensor_not_dividing_mlp": (["parallel.tensor=4", "model.hf_config.intermediate_size=690"], 4, "must divide the model's intermediate_size"),
    "tensor_with_zero0": (["parallel.tensor=2", "zero=stage0"], 2, "ZeRO-0 writes none"),
    "tensor_gpt2": (["parallel.tensor=2", "model=tiny_gpt2"], 2, "AutoTP cannot shard model family 'gpt2'"),
    "removed_deepspeed_feature": (["+deepspeed.sparse_gradients=true"], 1, "DeepSpeed 0.19 removed"),
    "unknown_model_family": (["model.family=not_a_model"], 1, "model.family='not_a_model' is not a model type"),
    "pretrained_not_a_model_folder": (["model.pretrained=/tmp"], 1, "not a Hugging Face model folder"),
    "onebit_with_zero3": (["comm=onebit", "zero=stage3"], 2, "comm=onebit needs zero=stage0, but the config has zero=stage3"),
    "powersgd_with_zero2": (["comm=powersgd"], 2, "comm=powersgd needs zero=stage0, but the config has zero=stage2"),
    "local_sgd_with_bf16": (["comm=local_sgd", "zero=stage0", "precision=bf16"], 2, "comm=local_sgd needs precision=fp32"),
    "onebit_with_tensor_parallel": (["comm=onebit", "zero=stage0", "parallel.tensor=2"], 2, "every rank as a data-parallel replica"),
    "compression_with_pipeline": (["comm=fp16_reduce", "parallel.pipeline=2"], 2, "not supported with pipeline parallelism"),
    "zeropp_without_stage3": (["comm=zeropp_hpz"], 2, "comm=zeropp_hpz is ZeRO++, an extension of ZeRO stage 3"),
    "zeropp_quantization_on_cpu": (["comm=zeropp", "zero=stage3", "train.device=cpu"], 2, "exist only for GPUs"),
    "hpz_not_dividing_ranks": (["comm=zeropp_hpz", "zero=stage3", "comm.hpz_partition_size=3"], 2, "comm.hpz_partition_size=3 does not divide the 2 ranks"),
    "warmup_without_own_exchange": (["comm=bf16_reduce", "comm.warmup_steps=5"], 2, "a warm-up of uncompressed steps exists only for"),
    "local_sgd_checkpoints_between_syncs": (["comm=local_sgd", "zero=stage0", "checkpoint.interval=10"], 2, "checkpoint.interval=10 is not a multiple of comm.sync_every=8"),
    "powersgd_rank_zero": (["comm=powersgd", "zero=stage0", "comm.low_rank=0"], 2, "comm.low_rank must be 1 or more, got 0"),
    "unknown_outer_optimizer": (["comm=local_sgd", "zero=stage0", "comm.outer_optimizer=adam"], 2, "comm.outer_optimizer='adam' is unknown"),
}

PROBE = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from pathlib import Path
    from bigtrain.train import main
    results = {}
    for name, (overrides, world_size, _) in json.loads(sys.argv[1]).items():
        os.environ["WORLD_SIZE"] = str(world_size)
        run_dir = Path(sys.argv[2]) / name
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([*overrides, f"run_dir={run_dir}"])
        results[name] = {"rc": rc, "stderr": err.getvalue(), "run_dir_made": run_dir.exists()}
    import torch.distributed as dist
    print(json.dumps({"cases": results, "deepspeed_imported": "deepspeed" in sys.modules,
                      "process_group": dist.is_available() and dist.is_initialized()}))
""")


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Run every bad config through the real entry point in one fresh interpreter."""
    tmp = tmp_path_factory.mktemp("refused")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(BAD_CONFIGS), str(tmp)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_before_heavy_work(refused, name):
    result = refused["cases"][name]
    message = result["stderr"]
    assert result["rc"] == 2
    assert BAD_CONFIGS[name][2] in message
    assert message.startswith("bigtrain: config error: ")
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1, "one paragraph, no stack dump"
    assert not result["run_dir_made"]


def test_nothing_heavy_started_for_any_refused_config(refused):
    assert not refused["deepspeed_imported"]
    assert not refused["process_group"]


def test_bf16_on_cpu_warns_only_without_bf16_units():
    cfg = compose(["precision=bf16", "train.device=cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(cfg, 1)
    slow = [w for w in caught if "will be very slow" in str(w.message)]
    assert len(slow) == (0 if cpu_has_bf16_units() else 1)


def test_valid_default_config_passes():
    validate(compose([]), 2)


def test_config_command_prints_derived_deepspeed_json():
    proc = subprocess.run(
        [sys.executable, "-m", "bigtrain.cli", "config", "--world-size", "2",
         "zero=stage3", "offload=optimizer", "train.grad_accum=4"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ds = json.loads(proc.stdout)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["gradient_accumulation_steps"] == 4


def test_config_command_refuses_bad_config():
    proc = subprocess.run(
        [sys.executable, "-m", "bigtrain.cli", "config", "offload=full"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "only ZeRO stage 3 can do" in proc.stderr
    assert proc.stdout == ""


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        compose(["zero=stage9"])
