"""The Weights & Biases sink. DeepSpeed has a W&B monitor, but the engine logs its own events to it
indexed by samples seen ("Train/Samples/lr" at step = samples), which moves W&B's step ahead of
bigtrain's step numbers, and W&B then drops every later record of a smaller step. So rank 0 logs
bigtrain's records itself, with `train/step` as their x axis."""

import importlib.util
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

WANDB_INSTALL_HINT = "pip install 'bigtrain[wandb]' (or pip install wandb)"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


class WandbSink:
    """One W&B run for one bigtrain run: offline mode writes it under run_dir/wandb and touches no
    network (`wandb sync run_dir/wandb/offline-run-*` uploads it later)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        import wandb

        self.wandb = wandb
        logging_cfg = cfg.logging
        self.run = wandb.init(
            project=logging_cfg.wandb_project, group=logging_cfg.wandb_group, name=run_dir.name,
            dir=str(run_dir), mode=logging_cfg.wandb_mode, config=OmegaConf.to_container(cfg, resolve=True),
            # its own run even when the Python API or a sweep trains several in one process
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")

    def log(self, record: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def finish(self) -> None:
        self.run.finish()
