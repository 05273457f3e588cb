"""Writing files and folders so that a reader never sees half of one: write under a temporary name
next to the target, then rename (atomic on one filesystem)."""

import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(out: Path) -> Path:
    """An empty folder beside `out` to build its new content in; hidden, named after it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    return staging


def replace_folder(staging: Path, out: Path) -> None:
    """Move the finished `staging` to `out`: readers see the old folder or the new one, never half of
    either, and what `out` held goes only once the new one is in place."""
    if out.exists():
        previous = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        staging.rename(out)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, synced to disk before it replaces `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
