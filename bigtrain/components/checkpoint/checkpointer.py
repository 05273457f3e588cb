"""Fault-tolerant saving and resuming through the DeepSpeed engine.

Completion is atomic: the manifest (every file with its size and SHA-256) is written by rank 0 only
after every rank has finished writing, and the `latest` pointer is then replaced atomically (see
store.py for the layout on disk). On resume the newest checkpoint whose manifest checks out is used;
damaged ones are skipped with a warning naming the bad file. A checkpoint saved with a different
number of data-parallel ranks under ZeRO is converted once to DeepSpeed's universal format and
loaded from there.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from bigtrain.components.checkpoint.fingerprint import check_fingerprint, run_fingerprint
from bigtrain.components.checkpoint.rng import capture_rng_state, restore_rng_state, rng_file, seed_everything
from bigtrain.components.checkpoint.safe_load import check_folder, safe_load, weights_only_loads
from bigtrain.components.checkpoint.store import (
    LATEST,
    MANIFEST,
    UNIVERSAL_DIR,
    checkpoint_dir,
    find_problem,
    free_bytes,
    list_tags,
    newest_valid,
    read_latest,
    read_manifest,
    sha256_of,
    tag_for,
)
from bigtrain.components.checkpoint.universal import convert_to_universal, universal_info
from bigtrain.components.files import atomic_write
from bigtrain.distributed.process_group import decided_by_rank0, long_wait_group
from bigtrain.distributed.topology import ProcessGrid
from bigtrain.errors import CheckpointError, ConfigError

log = logging.getLogger("bigtrain")


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, as agreed by all ranks."""

    path: str
    step: int
    world_size: int
    dp_size: int
    zero_stage: int
    pipeline: int = 1
    tensor: int = 1
    sequence: int = 1
    universal_path: str | None = None  # set when loaded through a universal conversion

    @property
    def grid(self) -> ProcessGrid:
        return ProcessGrid(self.dp_size, self.pipeline, self.tensor, self.sequence)


class Checkpointer:
    def __init__(self, cfg: DictConfig, rank: int, grid: ProcessGrid):
        ckpt = cfg.checkpoint
        self.dir = checkpoint_dir(cfg)
        self.interval = ckpt.interval
        self.save_final = ckpt.save_final
        self.keep = ckpt.keep
        self.resume_from = ckpt.resume
        self.verify_checksums = ckpt.verify_checksums
        self.zero_stage = cfg.zero.stage
        self.lora = cfg.model.lora.r > 0
        self.seed = cfg.seed
        self.rank = rank
        self.grid = grid
        self.world_size = grid.world_size
        self.dp_size = grid.data
        self.engine = None
        self.fingerprint = run_fingerprint(cfg) if self.is_main else {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def attach(self, engine) -> None:
        """Use `engine` for saving and loading. Its file writes are wrapped so that a failed write
        is recorded instead of raised: DeepSpeed's save runs collectives after the writes, and a
        rank that left early would leave the others waiting in them."""
        self.engine = engine
        self._write_error: str | None = None
        write = engine.checkpoint_engine.save

        def recorded_write(state_dict, path):
            if self._write_error is None:
                error = self._attempt(lambda: write(state_dict, path))
                self._write_error = error and f"writing {path}: {error}"

        engine.checkpoint_engine.save = recorded_write

    def due(self, completed_steps: int) -> bool:
        return self.interval > 0 and completed_steps % self.interval == 0

    def latest(self) -> Path | None:
        return read_latest(self.dir)

    # -- save

    def save(self, completed_steps: int, samples_seen: int) -> Path:
        """Save on every rank, then (rank 0) seal it with a manifest, move `latest`, prune old ones.

        If any rank fails to write, every rank raises CheckpointError and the previous checkpoint
        stays the newest valid one.
        """
        tag = tag_for(completed_steps)
        tag_dir = self.dir / tag
        client_state = {
            "step": completed_steps,
            "samples_seen": samples_seen,
            "world_size": self.world_size,
            "dp_size": self.dp_size,
            "zero_stage": self.zero_stage,
            "pipeline": self.grid.pipeline,
            "tensor": self.grid.tensor,
            "sequence": self.grid.sequence,
        }
        error = None
        if self.is_main and tag_dir.exists():  # left by a run that went further from an older point
            error = self._attempt(lambda: shutil.rmtree(tag_dir))
        if not self._all_ranks_ok(error):
            raise self._save_failed(tag_dir, error)
        error = self._attempt(lambda: tag_dir.mkdir(parents=True, exist_ok=True))
        if not self._all_ranks_ok(error):
            raise self._save_failed(tag_dir, error)
        self._write_error = None
        error = self._attempt(lambda: self._write_shards(tag, tag_dir, client_state)) or self._write_error
        if not self._all_ranks_ok(error):  # also the barrier: every rank's shards are written
            if self.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise self._save_failed(tag_dir, error)
        if self.is_main:
            error = self._attempt(lambda: self._seal(tag_dir, client_state))
        if not self._all_ranks_ok(error):  # no rank moves on (or exits) before the seal is on disk
            if self.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise self._save_failed(tag_dir, error)
        if self.is_main:
            self._prune(keep_always=tag_dir)
            log.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _attempt(self, action) -> str | None:
        # torch.save reports a full disk as a RuntimeError from its zip writer, not an OSError.
        try:
            action()
        except (OSError, RuntimeError) as err:
            detail = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
            free = free_bytes(self.dir)
            if free is not None and free < 64 * 2**20:
                detail = f"the disk holding it is full ({free / 2**20:.0f} MB free; {detail})"
            return detail
        return None

    def _all_ranks_ok(self, error: str | None) -> bool:
        # On the long-wait group: rank 0 may hash gigabytes for the manifest meanwhile.
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        dist.all_reduce(failed, group=long_wait_group())
        return int(failed.item()) == 0

    def _save_failed(self, tag_dir: Path, error: str | None) -> CheckpointError:
        previous = self.latest()
        keep = f"The previous checkpoint {previous} is intact." if previous else "No earlier checkpoint exists."
        detail = error or "another rank failed to write its part"
        return CheckpointError(
            f"Could not save checkpoint {tag_dir}: {detail}. {keep} Free disk space or point "
            "checkpoint.dir at a writable folder, then relaunch to resume."
        )

    def _write_shards(self, tag: str, tag_dir: Path, client_state: dict) -> None:
        # LoRA: the frozen base is rebuilt at resume (the manifest's fingerprint names it), not saved.
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, **universal_info(self.engine)},
                                    save_latest=False, exclude_frozen_parameters=self.lora)
        torch.save(capture_rng_state(), tag_dir / rng_file(self.rank))

    def _seal(self, tag_dir: Path, client_state: dict) -> None:
        files = {}
        for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
            files[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        manifest = {**client_state, "fingerprint": self.fingerprint, "files": files}
        atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write(self.dir / LATEST, tag_dir.name)

    def _prune(self, keep_always: Path) -> None:
        """Keep the newest `keep` valid checkpoints (and always the one just saved). Incomplete
        folders older than the newest valid one are leftovers of a crashed save and go too; newer
        ones may still be being written."""
        valid_seen = 0
        for tag_dir in list_tags(self.dir):
            complete = (tag_dir / MANIFEST).is_file()
            if complete:
                valid_seen += 1
            if tag_dir == keep_always:
                continue
            if valid_seen > self.keep or (valid_seen > 0 and not complete):
                shutil.rmtree(tag_dir, ignore_errors=True)
                shutil.rmtree(self.dir / UNIVERSAL_DIR / tag_dir.name, ignore_errors=True)

    # -- resume

    def find_resume_point(self) -> ResumePoint | None:
        """Rank 0 picks (and if needed converts) the checkpoint to resume from; all ranks get it."""
        return decided_by_rank0(lambda: self._check_writable() or self._choose())

    def _check_writable(self) -> None:
        """Fail at start-up, not at the first save hours later, if checkpoints cannot be written."""
        probe = self.dir / ".write_probe"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"checkpoint.dir {self.dir} is not writable ({type(err).__name__}: {err}). Point "
                "checkpoint.dir at a folder this job can create and write."
            ) from None

    def _choose(self) -> ResumePoint | None:
        if self.resume_from == "never":
            if list_tags(self.dir):
                raise ConfigError(
                    f"checkpoint.resume=never, but {self.dir} already holds checkpoints of an earlier "
                    "run, which this run would mix with its own. Use a new run_dir (or checkpoint.dir), "
                    "or checkpoint.resume=auto to continue that run."
                )
            return None
        if self.resume_from == "auto":
            tag_dir, warnings = newest_valid(self.dir, self.verify_checksums, self.latest())
            for warning in warnings:
                log.warning("%s; falling back to an earlier checkpoint", warning)
            if tag_dir is None:
                if warnings:
                    log.warning("no valid checkpoint in %s: starting from scratch", self.dir)
                return None
        else:
            tag_dir = Path(self.resume_from)
            problem = find_problem(tag_dir, self.verify_checksums) if tag_dir.is_dir() else "not a folder"
            if problem:
                raise ConfigError(
                    f"checkpoint.resume={self.resume_from!r} cannot be used: {problem}. Use "
                    "checkpoint.resume=auto to take the newest valid checkpoint of this run."
                )
        manifest = read_manifest(tag_dir)
        check_fingerprint(manifest.get("fingerprint"), self.fingerprint, str(tag_dir))
        check_folder(tag_dir)  # before any rank loads any of it
        point = ResumePoint(
            path=str(tag_dir),
            step=manifest["step"],
            world_size=manifest["world_size"],
            dp_size=manifest["dp_size"],
            zero_stage=manifest["zero_stage"],
            pipeline=manifest.get("pipeline", 1),
            tensor=manifest.get("tensor", 1),
            sequence=manifest.get("sequence", 1),
        )
        self._check_layout(tag_dir, point)
        # ZeRO shards the optimizer over data x sequence ranks: another count needs the universal format.
        if point.grid.zero_partitions != self.grid.zero_partitions and point.zero_stage > 0:
            point.universal_path = str(self._convert_to_universal(tag_dir, point))
        return point

    def _check_layout(self, tag_dir: Path, point: ResumePoint) -> None:
        """Model-parallel checkpoints hold per-stage or per-shard files that only the same
        pipeline x tensor layout can load."""
        model_parallel = (point.pipeline, point.tensor) != (1, 1) or self.grid.pipeline * self.grid.tensor > 1
        saved = point.grid
        if model_parallel and saved != self.grid:
            raise ConfigError(
                f"Checkpoint {tag_dir} was saved with {saved.describe()}, this run has "
                f"{self.grid.describe()}. A pipeline- or tensor-parallel checkpoint resumes only on the "
                f"same layout: relaunch with {saved.world_size} ranks and parallel.pipeline={point.pipeline} "
                f"parallel.tensor={point.tensor}, or export it (`bigtrain export`) and start a new run from "
                "the exported model (model.pretrained=PATH)."
            )

    def _convert_to_universal(self, tag_dir: Path, point: ResumePoint) -> Path:
        """ZeRO shards optimizer state by data-parallel rank, so DeepSpeed cannot load a checkpoint
        saved with another number of ranks. Its universal format stores each parameter whole."""
        out = self.dir / UNIVERSAL_DIR / tag_dir.name
        done = out / ".complete"
        log.warning(
            "checkpoint %s was saved with %s, this run has %s: converting it to DeepSpeed's universal format in %s",
            tag_dir.name, point.grid.describe(), self.grid.describe(), out,
        )
        if done.is_file():
            log.info("reusing the universal conversion already in %s", out)
            return out
        try:
            convert_to_universal(tag_dir, out)
        except CheckpointError as err:
            raise CheckpointError(f"{err}\nResume with the original layout ({point.grid.describe()}) instead.") from None
        done.touch()
        return out

    def _repair_universal_load(self, groups: list[dict], weight_decays: list[float]) -> None:
        """What DeepSpeed's ZeRO-3 universal loader (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        gets wrong with more than one parameter group (bigtrain has two: with and without weight decay),
        measured as a drift from the reference after a change of rank count:
        - it gives every group the first group's hyperparameters, so the no-decay group would decay;
        - it gives every group's state one shared `step` tensor, which each group's update then advances,
          so Adam's bias correction would count every step once per group."""
        for group, weight_decay in zip(groups, weight_decays):
            group["weight_decay"] = weight_decay
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def load(self, point: ResumePoint) -> dict:
        """Load `point` into the attached engine and this rank's RNG; return the client state."""
        path = Path(point.universal_path or point.path)
        groups = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer).param_groups
        weight_decays = [group["weight_decay"] for group in groups]
        with weights_only_loads(path):
            loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                               load_module_strict=not self.lora)
        if point.universal_path:
            self._repair_universal_load(groups, weight_decays)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}.")
        rng_path = Path(point.path) / rng_file(self.rank)
        if point.world_size == self.world_size and rng_path.is_file():
            restore_rng_state(safe_load(rng_path))
        else:
            # A rank that did not exist (or a different layout): a fresh, reproducible stream.
            seed_everything(self.seed + 1_000_003 * point.step + self.rank)
        if self.is_main:
            how = " (through the universal format)" if point.universal_path else ""
            log.info("resumed from %s at step %d%s", point.path, point.step, how)
        return client_state
