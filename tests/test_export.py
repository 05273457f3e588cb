"""`bigtrain export` writes a plain HF model folder whose logits equal the trained engine's."""

import subprocess

import pytest
import torch
from conftest import BIN, FAST, bigtrain_in_process, pool_train, read_metrics
from engine_logits import engine_logits, fixed_batch
from reference import reference_losses
from transformers import AutoModelForCausalLM, AutoTokenizer

from bigtrain.config import compose


@pytest.mark.parametrize("stage,model", [(3, "tiny_llama"), (0, "tiny_gpt2")])
def test_exported_model_gives_the_engines_logits(rank_pool, rank_pool1, tmp_path, stage, model):
    run_dir = tmp_path / "run"
    rank_pool.run(pool_train, [*FAST, "train.max_steps=3", f"zero=stage{stage}", f"model={model}",
                               f"run_dir={run_dir}"])
    out = tmp_path / "hf"
    proc = bigtrain_in_process("export", run_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    logits_of_engine = rank_pool.run(engine_logits, str(run_dir))[0]

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=fixed_batch(hf.config.vocab_size)).logits
    # Same fp32 weights, same kernels: equal up to summation order in the matmuls.
    torch.testing.assert_close(hf_logits, logits_of_engine, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]

    if stage == 3:  # the exported folder is also a starting point for a new run (model.pretrained)
        finetune = tmp_path / "finetune"
        rank_pool1.run(pool_train, [*FAST, "train.max_steps=1", f"model.pretrained={out}",
                                    f"data.tokenizer={out}", f"run_dir={finetune}"])
        first_loss = read_metrics(finetune)[0]["loss"]
        fresh_loss = reference_losses(compose(FAST), dp_size=1, steps=1)[0]  # same batch, fresh init
        assert first_loss < fresh_loss - 0.3, "starts from the trained weights, not a fresh init"


@pytest.mark.commands
def test_export_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    # the command as a process: the entry point itself (the other export tests call it in-process)
    proc = subprocess.run([str(BIN / "bigtrain"), "export", str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not a bigtrain run dir" in proc.stderr
