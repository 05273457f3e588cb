"""Set-up for the sinks DeepSpeed's monitor writes to that need more than its config: Weights & Biases
reads its mode, folder and run name from the environment, and is finished when the run closes."""

import importlib.util
import os
import sys
from pathlib import Path

WANDB_INSTALL_HINT = "pip install 'bigtrain[wandb]' (or pip install wandb)"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def prepare_wandb(logging_cfg, run_dir: Path) -> None:
    """Before the engine exists (DeepSpeed's monitor calls wandb.init then): offline mode writes the
    run under run_dir/wandb and touches no network; `wandb sync run_dir/wandb/offline-run-*` uploads."""
    if not logging_cfg.wandb:
        return
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = logging_cfg.wandb_mode
    os.environ["WANDB_DIR"] = str(run_dir)
    os.environ.setdefault("WANDB_NAME", run_dir.name)
    os.environ.setdefault("WANDB_SILENT", "true")


def finish_wandb() -> None:
    """End the W&B run now rather than at interpreter exit, so that a later run in the same process
    (the Python API, a sweep) starts a run of its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
