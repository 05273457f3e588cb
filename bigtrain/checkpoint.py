"""Checkpoints through the DeepSpeed engine: periodic and final saves, keep-last-K, resume."""

import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from bigtrain.config.errors import ConfigError

log = logging.getLogger("bigtrain")
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, cfg: DictConfig, engine, is_main: bool):
        ckpt = cfg.checkpoint
        self.dir = Path(ckpt.dir) if Path(ckpt.dir).is_absolute() else Path(cfg.run_dir) / ckpt.dir
        self.interval = ckpt.interval
        self.keep = ckpt.keep
        self.resume_from = ckpt.resume
        self.engine = engine
        self.is_main = is_main

    def due(self, completed_steps: int) -> bool:
        return self.interval > 0 and completed_steps % self.interval == 0

    def save(self, completed_steps: int) -> Path:
        """Save on every rank (each writes its own shards), then drop checkpoints beyond `keep`."""
        tag = tag_for(completed_steps)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={"step": completed_steps})
        dist.barrier()  # every rank's shards are on disk before anything older is deleted
        if self.is_main:
            self._prune()
            log.info("saved checkpoint %s", self.dir / tag)
        return self.dir / tag

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or None before the first save."""
        pointer = self.dir / "latest"
        return self.dir / pointer.read_text().strip() if pointer.is_file() else None

    def _prune(self) -> None:
        tags = sorted(p for p in self.dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        for old in tags[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        """Load the checkpoint chosen by checkpoint.resume; return the number of completed steps."""
        if self.resume_from == "never":
            return 0
        if self.resume_from == "auto":
            if not (self.dir / "latest").is_file():
                return 0
            load_dir, tag = self.dir, None
        else:
            path = Path(self.resume_from)
            if not path.is_dir():
                raise ConfigError(
                    f"checkpoint.resume={self.resume_from!r} is not a checkpoint folder. Use auto, "
                    "never, or the path of a step_* folder under a run's checkpoints/."
                )
            load_dir, tag = path.parent, path.name
        loaded_path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded_path is None:
            raise ConfigError(f"No loadable checkpoint found in {load_dir} (tag {tag}).")
        step = int(client_state["step"])
        if self.is_main:
            log.info("resumed from %s at step %d", loaded_path, step)
        return step
