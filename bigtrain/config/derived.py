"""Values derived from the config that several parts of bigtrain act on."""

import logging
import os
import shutil
import subprocess

from omegaconf import DictConfig

log = logging.getLogger("bigtrain")


def resolve_device(cfg: DictConfig) -> str:
    """The device this run trains on: 'cuda' or 'cpu'. `auto` follows DS_ACCELERATOR=cpu where it is set
    (the test suite sets it on GPU machines too, so that it trains on the CPU there as here), else takes
    a GPU when torch can use one."""
    if cfg.train.device != "auto":
        return cfg.train.device
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    _warn_if_gpus_unusable()
    return "cpu"


def _warn_if_gpus_unusable() -> None:
    """train.device=auto on a machine whose GPUs torch cannot use (a CPU-only wheel, or a CUDA build the
    driver is too old for) would quietly train on the CPU: say so, once."""
    global _warned
    if _warned or not shutil.which("nvidia-smi"):
        return
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if listed.returncode == 0 and "GPU" in listed.stdout:
        import torch

        _warned = True
        log.warning(
            "this machine has GPUs (nvidia-smi lists %d) but torch %s (CUDA build %s) cannot use them, so "
            "train.device=auto trains on the CPU. Install a torch build for this driver (make setup does when "
            "nvidia-smi works), or set train.device=cuda to be refused instead.",
            listed.stdout.count("GPU "), torch.__version__, torch.version.cuda or "none",
        )


_warned = False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_tokenizer(cfg: DictConfig, bundled: str) -> str:
    """The tokenizer of a run whose data group names none: the one data=prepared folders were made with,
    else model.pretrained's own (a fine-tuned model keeps its ids), else the bundled one."""
    import json
    from pathlib import Path

    if cfg.data.sources:
        first = cfg.data.sources[0]
        folder = first if isinstance(first, str) else first.get("path")
        try:
            return json.loads((Path(str(folder)) / "meta.json").read_text())["tokenizer"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return bundled  # validation reports the folder itself
    if cfg.model.pretrained and any((Path(cfg.model.pretrained) / f).is_file() for f in TOKENIZER_FILES):
        return str(Path(cfg.model.pretrained).absolute())
    return bundled
