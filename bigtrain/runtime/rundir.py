"""The run directory shared by all ranks: rank 0 writes the composed config, the DeepSpeed config and
the log; every rank writes its checkpoint shards below it. One job at a time: the job's rank 0 holds
an exclusive lock on the run dir (and on a checkpoint dir outside it) before anything is written."""

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bigtrain.errors import ConfigError

log = logging.getLogger("bigtrain")
LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive lock on a folder, held by this process until `release` or its exit: the kernel
    drops it when the holder dies, however it dies, so a crashed job's lock never blocks the next one.
    The lock file says who holds it (host, pid, start time, command) for the refusal message."""

    def __init__(self, folder: Path, key: str = "run_dir"):
        self.folder = folder
        self.key = key  # the config key that names the folder, for messages
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"{self.key} {self.folder} is not writable ({type(err).__name__}: {err.strerror}). Point "
                              f"{self.key} at a folder this job can create and write.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.folder} is in use by another job ({holder}): two jobs in one folder would overwrite each "
                "other's config, checkpoints and metrics. Wait for that job to end, stop it, or give this one "
                "another run_dir (the default run dir is named after the overrides, so identical commands share "
                "one)."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"held by pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)[:300]}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_config(cfg: DictConfig) -> None:
    """config.yaml: the composed config of the run, written once the run is known to go ahead."""
    (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


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
