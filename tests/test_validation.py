"""Bad configs are refused at composition with one clear message, exit code 2, and no heavy work:
no process group, no DeepSpeed import, no run directory."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from conftest import bigtrain_in_process

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
    "unknown_model": (["model=llama_9000"], 1, "Unknown model option 'llama_9000' (from 'model=llama_9000'). Choose one of: debug_llama, gpt2_small, llama_1b, tiny_gpt2, tiny_llama"),
    "unknown_group_option": (["zero=stage9"], 1, "Unknown zero option 'stage9'"),
    "unknown_key": (["train.max_stepz=5"], 1, "Unknown config key 'train.max_stepz'"),
    "moved_key": (["parallel.activation_checkpoint_interval=1"], 1, "Use train.activation_checkpointing=full"),
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
    "powersgd_with_sequence_parallel": (["comm=powersgd", "zero=stage0", "parallel.sequence=2"], 2,
                                        "sequence-parallel ranks hold pieces of one sequence"),
    "compression_with_pipeline": (["comm=fp16_reduce", "parallel.pipeline=2"], 2, "not supported with pipeline parallelism"),
    "zeropp_without_stage3": (["comm=zeropp_hpz"], 2, "comm=zeropp_hpz is ZeRO++, an extension of ZeRO stage 3"),
    "zeropp_quantization_on_cpu": (["comm=zeropp", "zero=stage3", "train.device=cpu"], 2, "exist only for GPUs"),
    "hpz_not_dividing_ranks": (["comm=zeropp_hpz", "zero=stage3", "comm.hpz_partition_size=3"], 2, "comm.hpz_partition_size=3 does not divide the 2 ranks"),
    "warmup_without_own_exchange": (["comm=bf16_reduce", "comm.warmup_steps=5"], 2, "a warm-up of uncompressed steps exists only for"),
    "local_sgd_checkpoints_between_syncs": (["comm=local_sgd", "zero=stage0", "checkpoint.interval=10"], 2, "checkpoint.interval=10 is not a multiple of comm.sync_every=8"),
    "powersgd_rank_zero": (["comm=powersgd", "zero=stage0", "comm.low_rank=0"], 2, "comm.low_rank must be 1 or more, got 0"),
    "unknown_outer_optimizer": (["comm=local_sgd", "zero=stage0", "comm.outer_optimizer=adam"], 2, "comm.outer_optimizer='adam' is unknown"),
    # values accepted silently, or that crashed, before
    "a_new_key_nobody_reads": (["+train.max_step=5"], 1, "Unknown config key 'train.max_step'"),
    "negative_min_lr_ratio": (["scheduler.min_lr_ratio=-3"], 1, "scheduler.min_lr_ratio=-3.0 must be in [0, 1]"),
    "min_lr_ratio_above_one": (["scheduler.min_lr_ratio=2"], 1, "scheduler.min_lr_ratio=2.0 must be in [0, 1]"),
    "lr_nan": (["optimizer.lr=nan"], 1, "optimizer.lr=nan is not a finite number"),
    "lr_inf": (["optimizer.lr=inf"], 1, "optimizer.lr=inf is not a finite number"),
    "negative_eps": (["optimizer.eps=-1"], 1, "optimizer.eps=-1.0 must be above 0"),
    "negative_weight_decay": (["optimizer.weight_decay=-1"], 1, "optimizer.weight_decay=-1.0 must be 0 or more"),
    "beta_above_one": (["optimizer.betas=[1.5,0.9]"], 1, "must be two values in [0, 1)"),
    "device_tpu": (["train.device=tpu"], 1, "train.device='tpu' is not a device bigtrain trains on"),
    "deepspeed_log_level": (["logging.deepspeed_level=loud"], 1, "logging.deepspeed_level='loud' is not a log level"),
    "bogus_attention": (["model.attn_implementation=bogus"], 1, "is not an attention kernel transformers knows"),
    "zero_layers": (["model.hf_config.num_hidden_layers=0"], 1, "num_hidden_layers=0; it must be a whole number of 1 or more"),
    "hidden_size_not_a_number": (["model.hf_config.hidden_size=abc"], 1, "model.hf_config does not make a valid llama config"),
    "owned_zero_stage": (["++deepspeed.zero_optimization.stage=3"], 1, "deepspeed.zero_optimization.stage is set, but bigtrain derives it"),
    "owned_batch_size": (["++deepspeed.train_batch_size=999"], 1, "deepspeed.train_batch_size is set, but bigtrain derives it"),
    "override_without_key": (["=5"], 1, "Config group override must be a string or a list. Got int"),
    "group_set_to_null": (["model=null"], 1, "Config group override must be a string or a list. Got NoneType"),
    "section_deleted": (["~train"], 1, "The config section 'train' is missing"),
    # sequence parallelism, memory levers, LoRA, data
    "sequence_not_dividing_heads": (["parallel.sequence=3"], 3, "parallel.sequence=3 must divide the attention heads"),
    "sequence_not_dividing_seq_len": (["parallel.sequence=2", "train.seq_len=65"], 2, "train.seq_len=65 is not divisible by parallel.sequence=2"),
    "sequence_not_dividing_world": (["parallel.sequence=2"], 3, "3 processes cannot be split into pipeline=1 x tensor=1 x sequence=2"),
    "sequence_gpt2": (["parallel.sequence=2", "model=tiny_gpt2"], 2, "parallel.sequence=2 with model family 'gpt2'"),
    "sequence_eager_attention": (["parallel.sequence=2", "model.attn_implementation=eager"], 2, "Ulysses drops the attention mask"),
    "sequence_kv_heads": (["parallel.sequence=2", "model.hf_config.hidden_size=192", "model.hf_config.num_attention_heads=6",
                           "model.hf_config.num_key_value_heads=3"], 2, "3 key/value heads: one must divide the other"),
    "sequence_with_pipeline": (["parallel.sequence=2", "parallel.pipeline=2", "zero=stage1"], 4, "it does not nest inside pipeline parallelism"),
    "sequence_with_tensor": (["parallel.sequence=2", "parallel.tensor=2"], 4, "it does not nest inside tensor parallelism"),
    "unknown_activation_checkpointing": (["train.activation_checkpointing=some"], 1, "use none, or full"),
    "activation_offload_without_checkpointing": (["train.activation_offload=true"], 1, "it needs train.activation_checkpointing=full"),
    "tiling_with_pipeline": (["train.tiled_mlp=2", "parallel.pipeline=2", "zero=stage1"], 2, "tiling is for the whole-model layouts"),
    "lora_with_pipeline": (["model.lora.r=8", "parallel.pipeline=2", "zero=stage1"], 2, "LoRA trains with data and sequence parallelism"),
    "lora_unknown_target": (["model.lora.r=8", "model.lora.target_modules=[no_such_layer]"], 1, "does not fit model tiny_llama"),
    "unknown_data_format": (["data.format=tables"], 1, "data.format='tables' is not a data format"),
    "packed_sft_with_pipeline": (["data.format=chat", "parallel.pipeline=2", "zero=stage1"], 2, "pipeline stages rebuild positions and masks"),
    "wsd_decay_fraction_zero": (["scheduler=wsd", "scheduler.decay_fraction=0"], 1, "scheduler.decay_fraction=0.0"),
    "eval_batches_zero": (["eval.batches=0"], 1, "eval.batches must be 1 or more"),
    "validation_fraction_one": (["data.validation_fraction=1"], 1, "data.validation_fraction=1.0 must be in [0, 1)"),
    "blend_negative_weight": (["data=prepared", "data.sources=[{path: /tmp, weight: -1}]"], 1, "a weight is a positive number"),
    "prepared_folder_without_meta": (["data=prepared", "data.sources=[/tmp]"], 1, "/tmp is not a prepared data folder"),
    "bundled_data_without_chat_fields": (["data.format=chat"], 1, "has no field 'messages' (data.messages_field)"),
}
# Machine checks: refused here, where there is no GPU and no flash-attn (skipped where there are).
MACHINE_CONFIGS = {
    "cuda_without_a_gpu": (["train.device=cuda"], 1, "asks for a GPU, but torch sees none here"),
    "flash_attention_without_the_package": (["model.attn_implementation=flash_attention_2"], 1, "needs the flash-attn package"),
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


def machine_cases() -> dict:
    import importlib.util

    import torch

    cases = dict(MACHINE_CONFIGS)
    if torch.cuda.is_available():
        cases.pop("cuda_without_a_gpu")
    if importlib.util.find_spec("flash_attn") is not None:
        cases.pop("flash_attention_without_the_package")
    return cases


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Run every bad config through the real entry point in one fresh interpreter."""
    tmp = tmp_path_factory.mktemp("refused")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps({**BAD_CONFIGS, **machine_cases()}), str(tmp)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS) + sorted(MACHINE_CONFIGS))
def test_bad_config_is_refused_before_heavy_work(name, tmp_path, monkeypatch, capsys):
    """Through the real entry point, in this process (a run reaching training fails the test)."""
    from bigtrain.runtime import run as run_module
    from bigtrain.train import main

    if name not in {**BAD_CONFIGS, **machine_cases()}:
        pytest.skip("this machine has what the config asks for")
    overrides, world_size, words = {**BAD_CONFIGS, **MACHINE_CONFIGS}[name]
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(run_module, "run", lambda cfg: pytest.fail("the config was accepted and a run started"))
    run_dir = tmp_path / "run"
    code = main([*overrides, f"run_dir={run_dir}"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert words in message
    assert message.startswith("bigtrain: config error: ")
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1, "one paragraph, no stack dump"
    assert not run_dir.exists()


@pytest.mark.commands
def test_nothing_heavy_started_for_any_refused_config(refused):
    """Every refused config, in one fresh interpreter: each exits 2 with no run dir, and none of them
    imported DeepSpeed or made a process group."""
    assert all(case["rc"] == 2 and not case["run_dir_made"] for case in refused["cases"].values())
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


@pytest.mark.commands
def test_config_command_prints_derived_deepspeed_json():
    proc = bigtrain_in_process("config", "--world-size", "2", "zero=stage3", "offload=optimizer", "train.grad_accum=4")
    assert proc.returncode == 0, proc.stderr
    ds = json.loads(proc.stdout)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_batch_size"] == 8 * 4 * 2
    assert ds["gradient_accumulation_steps"] == 4


@pytest.mark.commands
def test_config_command_refuses_bad_config():
    proc = subprocess.run(
        [sys.executable, "-m", "bigtrain.cli", "config", "offload=full"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "only ZeRO stage 3 can do" in proc.stderr
    assert proc.stdout == ""


def test_an_empty_run_dir_is_refused():
    with pytest.raises(ConfigError, match="run_dir is empty, which would make the current directory the run dir"):
        compose(["run_dir="])


@pytest.mark.commands
def test_cli_refuses_a_world_of_no_processes_and_negative_gpu_memory():
    config = bigtrain_in_process("config", "--world-size", "0")
    plan = bigtrain_in_process("plan", "--device", "cuda", "--device-memory", "-80", "--baseline-gb", "1")
    assert config.returncode == 2 and "number of processes must be 1 or more, got 0" in config.stderr
    assert plan.returncode == 2 and "--device-memory -80.0" in plan.stderr, plan.stderr


@pytest.mark.commands
@pytest.mark.parametrize("case", ["empty_folder", "broken_json", "unknown_model_type", "world_size_not_a_number"])
def test_broken_folders_and_environment_are_one_paragraph(tmp_path, case):
    folder = tmp_path / "folder"
    folder.mkdir()
    env = dict(os.environ)
    if case == "empty_folder":
        overrides, words = [f"data.tokenizer={folder}"], "is empty"
    elif case == "broken_json":
        (folder / "config.json").write_text('{"model_type": "llama", ')
        overrides, words = [f"model.pretrained={folder}"], "is not a valid JSON file"
    elif case == "unknown_model_type":
        (folder / "config.json").write_text('{"model_type": "not_a_real_model"}')
        overrides, words = [f"model.pretrained={folder}"], "cannot be loaded"
    else:
        overrides, words = [], "WORLD_SIZE='abc' is not a whole number"
        env["WORLD_SIZE"] = "abc"
    proc = subprocess.run([sys.executable, "-m", "bigtrain.train", *overrides, f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.commands
def test_a_chat_file_whose_messages_lack_the_roles_is_refused_before_any_rank_starts(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}) + "\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"conversation": []}) + "\n")
    for path, words in ((chat, "message 0 has role 'human'; the roles are system, user, assistant"),
                        (missing, "has no field 'messages' (data.messages_field)")):
        proc = bigtrain_in_process("config", "data=hf", "data.builder=json", f"data.files=[{path}]", "data.format=chat")
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        compose(["zero=stage9"])


def test_attention_kernels_accepted_without_asking_transformers_are_ones_it_knows():
    """Validation takes these names on trust (to spare every check the import of transformers), so
    they must stay names transformers itself accepts."""
    from bigtrain.config.values import COMMON_ATTENTION, attention_implementations

    assert set(COMMON_ATTENTION) <= set(attention_implementations())
