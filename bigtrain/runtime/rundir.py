"""The run directory shared by all ranks: rank 0 writes the composed config, the DeepSpeed config and
the log; every rank writes its checkpoint shards below it."""

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bigtrain")


def prepare_run_dir(cfg: DictConfig, is_main: bool) -> Path:
    run_dir = Path(cfg.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


def write_ds_config(run_dir: Path, ds_config: dict, is_main: bool) -> None:
    if is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def setup_logging(run_dir: Path | None, is_main: bool, deepspeed_level: str) -> None:
    """bigtrain logs INFO on rank 0 (console and run_dir/train.log), warnings only elsewhere."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    logger = logging.getLogger("bigtrain")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    if not is_main:  # one set of progress bars per run, not one per rank
        import datasets

        datasets.disable_progress_bars()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(getattr(logging, deepspeed_level.upper()))
