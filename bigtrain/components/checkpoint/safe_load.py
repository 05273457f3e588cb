"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling can call any function the file names: a checkpoint from
elsewhere (or altered on disk) is code. bigtrain loads every checkpoint file with torch's
weights_only unpickler, which builds tensors, numbers, strings and containers and refuses anything
else, with an allow-list of the few plain DeepSpeed types its files hold. DeepSpeed's own loaders (the
engine's, zero_to_fp32, the universal conversion) ask torch for a full unpickle; inside
`weights_only_loads` torch is told to refuse that (TORCH_FORCE_WEIGHTS_ONLY_LOAD), so they get the
same safe one.
"""

import contextlib
import os
import pickle
import re
from pathlib import Path

import torch

from bigtrain.errors import ConfigError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_types() -> list:
    """Classes DeepSpeed pickles into its checkpoint files: plain values (an enum, loss-scaler state, a
    (numel, start) record of where a parameter's fragment lies) with no behaviour on unpickling. Found
    by loading checkpoints of every ZeRO stage, bf16, offload, pipeline and tensor parallelism."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads(folder: Path | None = None):
    """Every torch.load in this block (DeepSpeed's included) unpickles weights only. A file that holds
    anything else is refused with ConfigError naming it (`folder` is searched for it)."""
    saved = os.environ.get(FORCE)
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            yield
    except pickle.UnpicklingError as err:
        found = _culprit(folder) if folder else None
        raise (refused(*found) if found else refused(None, err)) from None
    finally:
        if saved is None:
            os.environ.pop(FORCE, None)
        else:
            os.environ[FORCE] = saved


def safe_load(path: Path):
    """torch.load of one checkpoint file, weights only."""
    with torch.serialization.safe_globals(deepspeed_types()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise refused(path, err) from None


def refused(path: Path | None, err: Exception) -> ConfigError:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the Python object {found.group(1)}" if found else "something other than tensors and plain values"
    where = f"{path}" if path else "a file of this checkpoint"
    return ConfigError(
        f"Refusing to load {where}: it holds {what}, and unpickling it could run code, so nothing was "
        "loaded from it. bigtrain's and DeepSpeed's checkpoint files hold only tensors and plain values; this "
        "one was altered or comes from elsewhere. Resume or export a checkpoint this run wrote (another "
        "step_* folder), or delete this one."
    )


def check_folder(folder: Path) -> None:
    """Refuse a checkpoint folder holding a file the weights-only unpickler would not load, before any
    rank loads any of it. Cheap: the files are memory-mapped, so only their small pickled index is read."""
    found = _culprit(folder)
    if found is not None:
        raise refused(*found)


def _culprit(folder: Path) -> tuple[Path, Exception] | None:
    """The first `.pt` file under `folder` that the weights-only unpickler refuses, with its error."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(deepspeed_types()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            return path, err
        except Exception:  # noqa: BLE001 - unreadable for another reason: the manifest check names it
            continue
    return None
