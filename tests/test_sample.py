"""`bigtrain sample` continues a prompt with the newest checkpoint of a real run: the same text as the
exported model's own greedy generation."""

import subprocess

import pytest
import torch
from conftest import BIN, bigtrain_in_process
from shared_run import monitored_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from bigtrain.tools.export import export

PROMPT = "A computer is"


@pytest.mark.multiprocess
def test_sample_prints_the_greedy_continuation_of_the_newest_checkpoint(tmp_path_factory, tmp_path):
    run_dir, _ = monitored_run(tmp_path_factory)
    proc = subprocess.run([str(BIN / "bigtrain"), "sample", str(run_dir), "--prompt", PROMPT,
                           "--max-new-tokens", "12"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "step_00000010" in proc.stderr  # the newest checkpoint, named in the log

    # The same continuation, from the checkpoint exported by hand and generated here.
    exported = tmp_path / "hf"
    export(str(run_dir), str(exported))
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = PROMPT + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1]
    assert proc.stdout == expected + "\n"  # nothing else on stdout


@pytest.mark.commands
def test_sample_without_a_run_is_refused(tmp_path):
    proc = bigtrain_in_process("sample", tmp_path, "--prompt", "x")
    assert proc.returncode == 2
    assert "is not a bigtrain run dir" in proc.stderr
