"""`bigtrain export` writes a plain HF model folder whose logits equal the trained engine's."""

import os
import subprocess

import pytest
import torch
from conftest import BIN, FAST, free_port, read_metrics, run_bigtrain
from engine_logits import fixed_batch
from reference import reference_losses
from transformers import AutoModelForCausalLM, AutoTokenizer

from bigtrain.config import compose

HERE = os.path.dirname(__file__)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage,model", [(3, "tiny_llama"), (0, "tiny_gpt2")])
def test_exported_model_gives_the_engines_logits(tmp_path, stage, model):
    run_dir = tmp_path / "run"
    run_bigtrain("torchrun", 2, [*FAST, "train.max_steps=3", f"zero=stage{stage}", f"model={model}",
                                 f"run_dir={run_dir}"], cwd=tmp_path)
    out = tmp_path / "hf"
    proc = subprocess.run([str(BIN / "bigtrain"), "export", str(run_dir), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    engine_out = tmp_path / "engine_logits.pt"
    subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    os.path.join(HERE, "engine_logits.py"), str(run_dir), str(engine_out)],
                   check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=HERE))
    engine_logits = torch.load(engine_out)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=fixed_batch(hf.config.vocab_size)).logits
    # Same fp32 weights, same kernels: equal up to summation order in the matmuls.
    torch.testing.assert_close(hf_logits, engine_logits, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]

    if stage == 3:  # the exported folder is also a starting point for a new run (model.pretrained)
        finetune = tmp_path / "finetune"
        run_bigtrain("python", 1, [*FAST, "train.max_steps=1", f"model.pretrained={out}",
                                   f"data.tokenizer={out}", f"run_dir={finetune}"], cwd=tmp_path)
        first_loss = read_metrics(finetune)[0]["loss"]
        fresh_loss = reference_losses(compose(FAST), dp_size=1, steps=1)[0]  # same batch, fresh init
        assert first_loss < fresh_loss - 0.3, "starts from the trained weights, not a fresh init"


def test_export_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    proc = subprocess.run([str(BIN / "bigtrain"), "export", str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not a bigtrain run dir" in proc.stderr
