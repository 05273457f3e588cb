"""Fault-tolerant checkpoints through the DeepSpeed engine.

A checkpoint is `checkpoints/step_NNNNNNNN/`: DeepSpeed's files (model, optimizer shards, scheduler,
client state), one RNG file per rank, and `manifest.json`. Completion is atomic: the manifest (every
file with its size and SHA-256) is written by rank 0 only after every rank has finished writing, and
the `latest` pointer is then replaced atomically. A folder without a valid manifest never counts.

On resume the newest checkpoint whose manifest checks out is used; damaged ones are skipped with a
warning naming the bad file. A checkpoint saved with a different number of data-parallel ranks under
ZeRO is converted once to DeepSpeed's universal format and loaded from there.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from bigtrain.config.errors import ConfigError
from bigtrain.distributed import long_wait_group
from bigtrain.parallel.topology import Layout

log = logging.getLogger("bigtrain")
TAG_PATTERN = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


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
    universal_path: str | None = None  # set when loaded through a universal conversion


def checkpoint_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.checkpoint.dir)
    return path if path.is_absolute() else Path(cfg.run_dir) / path


def read_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint folder the `latest` pointer names (unchecked), or None without a pointer."""
    pointer = ckpt_dir / LATEST
    return ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None


# ---------------------------------------------------------------------------------------- verify


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_problem(tag_dir: Path, verify_checksums: bool = True) -> str | None:
    """Why `tag_dir` is not a complete, undamaged checkpoint; None when it is."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save never completed, or the file was removed)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest_path} is unreadable ({err})"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} is truncated or altered ({size} bytes, manifest says {expected['size']})"
        if verify_checksums and sha256_of(path) != expected["sha256"]:
            return f"{path} does not match its checksum in the manifest"
    return None


def list_tags(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
    return sorted(tags, key=lambda p: int(TAG_PATTERN.match(p.name).group(1)), reverse=True)


def newest_valid(
    ckpt_dir: Path, verify_checksums: bool = True, latest: Path | None = None
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that checks out, and a warning for each newer one that did not.

    The `latest` pointer, when given, is tried first: after resuming from an older checkpoint the
    most recent save need not have the highest step number.
    """
    warnings = []
    candidates = list_tags(ckpt_dir)
    if latest is not None and latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    for tag_dir in candidates:
        problem = find_problem(tag_dir, verify_checksums)
        if problem is None:
            return tag_dir, warnings
        warnings.append(f"checkpoint {tag_dir.name} is damaged or incomplete: {problem}")
    return None, warnings


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


# ------------------------------------------------------------------------------------- save/load


class Checkpointer:
    def __init__(self, cfg: DictConfig, rank: int, layout: Layout):
        ckpt = cfg.checkpoint
        self.dir = checkpoint_dir(cfg)
        self.interval = ckpt.interval
        self.save_final = ckpt.save_final
        self.keep = ckpt.keep
        self.resume_from = ckpt.resume
        self.verify_checksums = ckpt.verify_checksums
        self.zero_stage = cfg.zero.stage
        self.seed = cfg.seed
        self.rank = rank
        self.layout = layout
        self.world_size = layout.world_size
        self.dp_size = layout.data
        self.engine = None

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
            "pipeline": self.layout.pipeline,
            "tensor": self.layout.tensor,
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
            free = _free_bytes(self.dir)
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
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(capture_rng_state(), tag_dir / rng_file(self.rank))

    def _seal(self, tag_dir: Path, client_state: dict) -> None:
        files = {}
        for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
            files[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        manifest = {**client_state, "files": files}
        _atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _atomic_write(self.dir / LATEST, tag_dir.name)

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
        decision = [None]
        if self.is_main:
            try:
                self._check_writable()
                decision[0] = self._choose()
            except (ConfigError, CheckpointError) as err:
                decision[0] = err
        dist.broadcast_object_list(decision, src=0, group=long_wait_group())
        if isinstance(decision[0], Exception):
            raise decision[0]
        return decision[0]

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
        point = ResumePoint(
            path=str(tag_dir),
            step=manifest["step"],
            world_size=manifest["world_size"],
            dp_size=manifest["dp_size"],
            zero_stage=manifest["zero_stage"],
            pipeline=manifest.get("pipeline", 1),
            tensor=manifest.get("tensor", 1),
        )
        self._check_layout(tag_dir, point)
        if point.dp_size != self.dp_size and point.zero_stage > 0:
            point.universal_path = str(self._convert_to_universal(tag_dir, point))
        return point

    def _check_layout(self, tag_dir: Path, point: ResumePoint) -> None:
        """Model-parallel checkpoints hold per-stage or per-shard files that only the same
        pipeline x tensor layout can load."""
        model_parallel = (point.pipeline, point.tensor) != (1, 1) or self.layout.pipeline * self.layout.tensor > 1
        saved = Layout(point.dp_size, point.pipeline, point.tensor)
        if model_parallel and saved != self.layout:
            raise ConfigError(
                f"Checkpoint {tag_dir} was saved with {saved.describe()}, this run has "
                f"{self.layout.describe()}. A pipeline- or tensor-parallel checkpoint resumes only on the "
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
            "checkpoint %s was saved with %d data-parallel ranks, this run has %d: converting it "
            "to DeepSpeed's universal format in %s",
            tag_dir.name, point.dp_size, self.dp_size, out,
        )
        if done.is_file():
            log.info("reusing the universal conversion already in %s", out)
            return out
        try:
            convert_to_universal(tag_dir, out, point.zero_stage)
        except CheckpointError as err:
            raise CheckpointError(f"{err}\nResume with the original {point.dp_size} data-parallel ranks instead.") from None
        done.touch()
        return out

    def load(self, point: ResumePoint) -> dict:
        """Load `point` into the attached engine and this rank's RNG; return the client state."""
        path = Path(point.universal_path or point.path)
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}.")
        rng_path = Path(point.path) / rng_file(self.rank)
        if point.world_size == self.world_size and rng_path.is_file():
            restore_rng_state(torch.load(rng_path, weights_only=False))
        else:
            # A rank that did not exist (or a different layout): a fresh, reproducible stream.
            seed_everything(self.seed + 1_000_003 * point.step + self.rank)
        if self.is_main:
            how = " (through the universal format)" if point.universal_path else ""
            log.info("resumed from %s at step %d%s", point.path, point.step, how)
        return client_state


def convert_to_universal(tag_dir: Path, out: Path, zero_stage: int) -> None:
    """Rewrite a ZeRO checkpoint in DeepSpeed's universal format, where every parameter is stored
    whole (ZeRO shards and tensor-parallel slices merged): `out/zero/<name>/fp32.pt`."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(out),
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]
    if zero_stage < 3:
        command.append("--inject_missing_state")  # ZeRO-1/2 shards lack the param-shape map it needs
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"Converting {tag_dir} to the universal format failed:\n{proc.stderr[-3000:]}")


# -------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
