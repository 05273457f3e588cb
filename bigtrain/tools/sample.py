"""`bigtrain sample`: a quick look at what a run has learned, a continuation of a prompt generated
by the newest checkpoint through the exported Hugging Face model."""

import contextlib
import sys
import tempfile
from pathlib import Path

from bigtrain.errors import ConfigError


def sample(run_dir: str, prompt: str, *, max_new_tokens: int = 40, checkpoint: str | None = None,
           temperature: float = 0.0, seed: int = 0) -> str:
    """The prompt's continuation (greedy, or sampled when temperature > 0), without the prompt."""
    if not (Path(run_dir) / "config.yaml").is_file():  # before the heavy imports
        raise ConfigError(f"{run_dir} is not a bigtrain run dir (no config.yaml). Pass the run_dir of a run.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigtrain.tools.export import export

    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}.")
    if temperature < 0:
        raise ConfigError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    with tempfile.TemporaryDirectory(prefix="bigtrain-sample-") as folder:
        # The same path users take to get a model out of a run; DeepSpeed's checkpoint reader prints
        # its progress, which belongs with the logs, not in the sample on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            export(run_dir, folder, checkpoint)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise ConfigError("--prompt is empty once tokenized; give the model some text to continue.")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                                **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

