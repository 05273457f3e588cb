"""The Python API: `import bigtrain` stays cheap; `bigtrain.fit()` trains in the caller's process
(twice in a row, from overrides and from an edited config); `DistributedTraining.train_distributed`
really trains on 2 processes from a Hugging Face config and a `datasets` object, and runs the seed
document's examples as written."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from bigtrain.errors import ConfigError

SCRIPT = """
import json, sys, bigtrain
fast = {fast!r}
first = bigtrain.fit([*fast, "run_dir={tmp}/one"])
cfg = bigtrain.compose([*fast, "run_dir={tmp}/two"])
cfg.optimizer.lr = 3e-3
second = bigtrain.fit(config=cfg)
print(json.dumps([{{"loss": r.final_loss, "steps": r.steps, "run_dir": r.run_dir, "checkpoint": r.checkpoint,
                   "ok": r.ok, "metrics": len(r.metrics), "first_loss": r.metrics[0]["loss"]}}
                  for r in (first, second)]))
"""


@pytest.mark.commands
def test_importing_bigtrain_loads_neither_torch_nor_deepspeed():
    code = ("import sys, bigtrain; assert callable(bigtrain.fit); import bigtrain.train; "
            "assert callable(bigtrain.fit) and bigtrain.DistributedTraining and bigtrain.GPUAcceleratedTraining; "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.multiprocess
def test_fit_runs_in_the_callers_process_one_run_after_another(tmp_path):
    fast = [*FAST, "train.max_steps=4", "logging.progress=false"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(fast=fast, tmp=tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    for result, name in ((first, "one"), (second, "two")):
        assert result["ok"] and result["steps"] == 4 and result["metrics"] == 4
        assert result["run_dir"] == str(tmp_path / name)
        assert result["checkpoint"] == str(tmp_path / name / "checkpoints" / "step_00000004")
        assert result["loss"] < result["first_loss"]
    # Same data and init, a 3x learning rate from the edited config: a different run.
    assert second["loss"] != first["loss"]
    assert "lr: 0.003" in (tmp_path / "two" / "config.yaml").read_text()


@pytest.mark.multiprocess
def test_distributed_training_trains_on_two_processes(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig

    from bigtrain import DistributedTraining
    from bigtrain.config.compose import ASSET_DIR

    with gzip.open(ASSET_DIR / "corpus" / "devils_dictionary.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    data = Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    model = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    trainer = DistributedTraining([*FAST, "train.max_steps=12", "logging.interval=4"], run_dir=str(tmp_path / "run"),
                                  quiet=True)
    result = trainer.train_distributed(model, data, nodes=2)

    assert result["model"] == "llama-custom" and result["nodes"] == 2 and result["status"] == "distributed_trained"
    assert result["steps"] == 12 and result["checkpoint"].endswith("step_00000012")
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.3, losses  # it learned
    assert result["final_loss"] == losses[-1]
    # Two ranks: each wrote its ZeRO shard, and the global batch is two ranks' micro-batches.
    shards = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000012").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    ds_config = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 2 * 4
    # The ranks built the model from the config object and read the dataset object.
    composed = (tmp_path / "run" / "config.yaml").read_text()
    assert "hidden_size: 128" in composed and "train.parquet" in composed


@pytest.fixture
def small_model_folder(tmp_path):
    """A real (small) Hugging Face model folder, for the seed document's {"model_name": NAME}: the
    examples train with the config's defaults (200 steps), which a 0.6M-parameter model does in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "small-llama"
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


DOCUMENTED_KEYS = {"model_name", "nodes_used", "status"}


@pytest.mark.multiprocess
def test_seed_example_1_basic_training_across_nodes(tmp_path, monkeypatch, small_model_folder):
    from bigtrain import DistributedTraining

    monkeypatch.chdir(tmp_path)  # the default run dir is runs/... under the working directory
    # Example 1, with a real model and 2 processes:
    model = {"model_name": small_model_folder}
    data = {"samples": 100000, "features": 128}
    distributed_training = DistributedTraining()
    trained_model = distributed_training.train_distributed(model, data, nodes=2)
    print(f"Distributed Training Result: {trained_model}")

    assert DOCUMENTED_KEYS <= trained_model.keys()
    assert trained_model["model_name"] == "small-llama" and trained_model["nodes_used"] == 2
    assert trained_model["status"] == "distributed_trained"
    assert trained_model["steps"] == 200 and trained_model["losses"][-1] < trained_model["losses"][0] - 1
    composed = (tmp_path / trained_model["run_dir"] / "config.yaml").read_text()
    assert "seq_len: 128" in composed and "max_samples: 100000" in composed


@pytest.mark.multiprocess
def test_seed_example_3_gpu_accelerated_training(tmp_path, monkeypatch, small_model_folder):
    import torch

    from bigtrain import GPUAcceleratedTraining

    monkeypatch.chdir(tmp_path)
    model = {"model_name": small_model_folder}
    data = {"samples": 100000, "features": 128}
    gpu_training = GPUAcceleratedTraining()
    if not torch.cuda.is_available():  # Example 3 as written asks for GPUs: refused before anything starts
        with pytest.raises(ConfigError, match="use_gpus=True, but this machine has no GPU"):
            gpu_training.train_distributed(model, data, nodes=8, use_gpus=True)
        assert not (tmp_path / "runs").exists()
    use_gpus = torch.cuda.is_available()
    if not use_gpus:  # the same on 2 CPU processes; Example 1 already trains the default 200 steps on them
        gpu_training = GPUAcceleratedTraining(["train.max_steps=20"])
    trained_model_gpu = gpu_training.train_distributed(model, data, nodes=min(2, torch.cuda.device_count() or 2),
                                                       use_gpus=use_gpus)
    print(f"GPU Accelerated Training Result: {trained_model_gpu}")

    assert DOCUMENTED_KEYS | {"device"} <= trained_model_gpu.keys()
    assert trained_model_gpu["device"] == ("GPUs" if use_gpus else "CPUs")
    assert trained_model_gpu["status"] == "distributed_trained_with_acceleration"
    assert trained_model_gpu["steps"] == (200 if use_gpus else 20)


def test_a_model_that_is_neither_a_name_nor_a_folder_is_refused(tmp_path):
    from bigtrain import DistributedTraining

    with pytest.raises(ConfigError, match="neither a model in conf/model"):
        DistributedTraining(run_dir=str(tmp_path)).train_distributed("no_such_model", None, nodes=2)
    with pytest.raises(ConfigError, match="one key, model_name"):
        DistributedTraining(run_dir=str(tmp_path)).train_distributed({"name": "tiny_llama"}, None, nodes=2)
    with pytest.raises(ConfigError, match="unknown key"):
        DistributedTraining(run_dir=str(tmp_path)).train_distributed({"model_name": "tiny_llama"}, {"rows": 3})


@pytest.mark.multiprocess
def test_fit_launches_a_composed_config_of_another_model_into_its_default_run_dir(tmp_path, monkeypatch):
    """The docstring's recipe: compose with a model group, edit, fit on 2 ranks. The config arrives
    whole (its model group is not merged onto the default model's), and the default run dir, whose
    name holds '=' and ',', reaches the ranks intact."""
    import bigtrain

    monkeypatch.chdir(tmp_path)
    cfg = bigtrain.compose([*FAST, "model=tiny_gpt2", "logging.progress=false"])
    cfg.train.max_steps = 2
    result = bigtrain.fit(config=cfg, nproc=2, quiet=True)
    assert result.ok and result.steps == 2, result
    assert (tmp_path / result.run_dir).resolve().parent == tmp_path / "runs"
    saved = (Path(result.run_dir) / "config.yaml").read_text()
    assert "name: tiny_gpt2" in saved and "max_steps: 2" in saved
    with pytest.raises(ConfigError, match="not both"):
        bigtrain.fit(["train.max_steps=3"], config=cfg)
