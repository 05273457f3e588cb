"""DeepSpeed's universal checkpoint format: every parameter stored whole, so a checkpoint can be
loaded on another number of data-parallel ranks or exported from tensor-parallel slices."""

import shutil
import subprocess
import sys
from pathlib import Path

from bigtrain.errors import CheckpointError


def universal_info(engine) -> dict:
    """Client state that lets DeepSpeed's converter read a ZeRO-1/2 checkpoint: the converter requires
    the client to record the universal-format version it writes for ("Verify that client creates this
    state"); under AutoTP the engine records its own, with the layout of the sharded weights."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    if getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is not None:
        return {}
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def convert_to_universal(tag_dir: Path, out: Path) -> None:
    """Rewrite a ZeRO checkpoint in DeepSpeed's universal format, where every parameter is stored
    whole (ZeRO shards and tensor-parallel slices merged): `out/zero/<name>/fp32.pt`."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "bigtrain.components.checkpoint.universal",
        "--input_folder", str(tag_dir), "--output_folder", str(out),
        "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"Converting {tag_dir} to the universal format failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    # DeepSpeed's converter, with every file it reads unpickled weights-only (safe_load.py).
    from deepspeed.checkpoint import ds_to_universal

    from bigtrain.components.checkpoint.safe_load import weights_only_loads

    arguments = ds_to_universal.parse_arguments()
    with weights_only_loads(Path(arguments.input_folder)):
        ds_to_universal.main(arguments)
