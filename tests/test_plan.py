"""`bigtrain plan`: its model-state accounting is DeepSpeed's own; it lists every ZeRO stage and
offload choice with what fits and a command for the recommended one; and its per-rank estimate is
within 25% of the peak RSS that real CPU runs of two layouts reach (metrics.jsonl's mem_gb).

Tolerance: 25%, the spec's. On the CPU the peak RSS holds the process itself (imports, measured by the
planner; DeepSpeed's runtime, a stated constant) and the allocator's cache of freed blocks, which
grows over the first steps and depends on the order of allocations, so no formula predicts it to the
megabyte; measured here, the estimate was within 17% of every run tried (1-2 ranks, ZeRO 0-3, 5M-30M
params, 256-2048 tokens per micro-batch; the ZeRO-3 offload case below has measured 5-17% under). A missing term (an unpartitioned optimizer state, activations of
the wrong size) moves it by far more than 25% on the 30M-parameter model.
"""

import json

import pytest
from conftest import bigtrain_in_process, run_bigtrain

from bigtrain.tools.memory import GB, TrainingSetup, model_state_bytes
from bigtrain.tools.plan import Hardware, plan, process_baseline_gb

WIDE = ["model.hf_config.hidden_size=512", "model.hf_config.intermediate_size=1376",
        "model.hf_config.num_attention_heads=8", "model.hf_config.num_key_value_heads=8",
        "model.hf_config.num_hidden_layers=8"]  # 29.5M parameters: model states of 0.3-0.5 GB per rank
# Long sequences (1024 tokens), where activations outweigh the model states (8.4M parameters): the
# activation levers must be in the estimate for it to land within 25%. Two steps reach the peak of a
# step (the allocator's cache of the first step's blocks included). Measured here: with checkpointing
# 1.19 GB (estimate +10%), with sequence parallelism 1.36 GB (+10%); an estimate that left the lever out
# (2.3 GB) would be 70-90% over.
LONG = ["model.hf_config.hidden_size=256", "model.hf_config.intermediate_size=688",
        "model.hf_config.num_attention_heads=8", "model.hf_config.num_key_value_heads=8",
        "model.hf_config.num_hidden_layers=8", "model.hf_config.max_position_embeddings=1024", "train.seq_len=1024",
        "train.micro_batch_size=4", "train.max_steps=2"]
# No held-out evaluation: under no_grad it peaks below a training step, so it only adds time (on the long
# cases as much as the training itself).
STEPS = ["train.max_steps=8", "logging.interval=1", "scheduler.warmup_steps=2", "checkpoint.save_final=false",
         "logging.progress=false", "eval.interval=0"]


def layout(stage: int, offload: str, dp: int) -> TrainingSetup:
    return TrainingSetup(stage=stage, offload=offload, data=dp, pipeline=1, tensor=1, micro_batch=1, grad_accum=1,
                  seq_len=1, precision="bf16", device="cuda", reduce_bucket=1)


def test_model_states_are_deepspeeds_estimates_for_16_bit_training():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest, gpus = 1_234_567_890, 262_668_288, 4  # one node of 4 GPUs
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=offload)
        device, host = model_state_bytes(params, largest, layout(2, "optimizer" if offload else "none", gpus))
        assert device == pytest.approx(gpu, abs=1)
        assert host * gpus * 1.5 == pytest.approx(cpu if offload else 0, rel=1e-9)
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus,
                                                            cpu_offload=offload, cpu_offload_params=offload_params)
        name = "full" if offload_params else "optimizer" if offload else "none"
        device, host = model_state_bytes(params, largest, layout(3, name, gpus))
        assert device == pytest.approx(gpu, abs=1)
        if offload:  # DeepSpeed's CPU figure is per node, with its 1.5 buffer factor
            assert host * gpus * 1.5 == pytest.approx(cpu, rel=1e-9)


@pytest.mark.commands
def test_plan_lists_every_choice_and_the_command_for_the_first_that_fits():
    proc = bigtrain_in_process(
        "plan", "--device", "cuda", "--device-memory", "24", "--ranks-per-node", "8", "--cpu-memory", "500",
        "--baseline-gb", "3", "model=llama_1b", "precision=bf16", "train.seq_len=1024", "train.micro_batch_size=1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("zero=")]
    assert len(rows) == 8
    assert "no:" in rows[0] and "GB per GPU > 90% of 24.0 GB" in rows[0]  # 1.2B params unpartitioned: ~20 GB states
    assert rows[-1].endswith("no: no NVMe stated (--nvme GB)")
    first_fit = next(row for row in rows if row.endswith("yes"))
    choice = " ".join(first_fit.split()[:2])
    assert f"recommended: {choice}" in proc.stdout
    assert (f"deepspeed --num_gpus 8 --module bigtrain.train model=llama_1b precision=bf16 train.seq_len=1024 "
            f"train.micro_batch_size=1 {choice}") in proc.stdout


@pytest.mark.commands
def test_plan_says_when_nothing_fits_and_refuses_bad_hardware():
    proc = bigtrain_in_process("plan", "--device", "cpu", "--cpu-memory", "1", "--baseline-gb", "0.6", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["recommended"] is None and not any(o["fits"] for o in result["options"])
    proc = bigtrain_in_process("plan", "--device", "cuda")
    assert proc.returncode == 2 and "--device-memory" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("overrides", [
    ["zero=stage2"],  # the default job's layout: tiny_llama, micro-batch 8 x 128 tokens
    # its peak is reached at step 2 (measured: 1.39, then 1.56 GB from step 2 to 8)
    ["zero=stage3", "offload=optimizer", "train.micro_batch_size=4", "train.seq_len=64", "train.max_steps=4", *WIDE],
    ["zero=stage2", "train.activation_checkpointing=full", *LONG],
    ["zero=stage2", "parallel.sequence=2", *LONG],
], ids=["tiny-zero2", "wide-zero3-offload", "long-checkpointed", "long-sequence-parallel"])
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, overrides):
    run_dir = tmp_path / "run"
    run_bigtrain("torchrun", 2, [*STEPS, *overrides, f"run_dir={run_dir}"], cwd=tmp_path)
    measured = max(json.loads(line)["mem_gb"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())

    hardware = Hardware(nodes=1, ranks_per_node=2, device="cpu", device_memory_gb=None, cpu_memory_gb=24.0,
                        nvme_gb=None)
    cfg, _, options = plan([*STEPS, *overrides], hardware, process_baseline_gb(None))
    offload = cfg.offload.name
    option = next(o for o in options if o.stage == cfg.zero.stage and o.offload == offload)
    estimated = option.estimate.device_gb
    print(f"estimate {estimated:.3f} GB, measured peak RSS {measured:.3f} GB "
          f"({(estimated - measured) / measured:+.1%}); components "
          f"{ {k: round(v / GB, 3) for k, v in option.estimate.device.items()} }")
    assert abs(estimated - measured) <= 0.25 * measured
    assert option.fits
