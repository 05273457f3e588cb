"""Checkpoints on disk: folder names, the manifest that seals a complete one, the `latest` pointer,
and finding the newest checkpoint that checks out.

A checkpoint is `checkpoints/step_NNNNNNNN/`: DeepSpeed's files (model, optimizer shards, scheduler,
client state), one RNG file per rank, and `manifest.json` listing every file with its size and
SHA-256. A folder without a valid manifest never counts.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

from omegaconf import DictConfig

TAG_PATTERN = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.checkpoint.dir)
    return path if path.is_absolute() else Path(cfg.run_dir) / path


def read_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint folder the `latest` pointer names (unchecked), or None without a pointer."""
    pointer = ckpt_dir / LATEST
    return ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None


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


def free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None
