"""bigtrain: train Hugging Face causal LMs with DeepSpeed, composed from Hydra config groups."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed compiles its C++ ops (cpu_adam, the shared-memory allreduce) on first use. Keeping them
# inside the environment means they are built once per install, by `make setup`, and reused by every
# process and test afterwards; an explicit TORCH_EXTENSIONS_DIR still wins.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# They must also be checked by the same ninja every time: ninja 1.12+ and older ones keep build logs
# in different formats, so a load through another version rebuilds the op from scratch (measured:
# 25 s for the shm allreduce, Debian's ninja 1.11 vs the 1.13 DeepSpeed installs), and every switch
# repeats it. Which one PATH finds differs between launchers (a pdsh session with the environment
# activated, a plain shell), so every bigtrain process puts the environment's own ninja first.
_env_bin = os.path.dirname(sys.executable)
if os.path.isfile(os.path.join(_env_bin, "ninja")) and not os.environ.get("PATH", "").startswith(_env_bin + os.pathsep):
    os.environ["PATH"] = _env_bin + os.pathsep + os.environ.get("PATH", "")


# The Python API, loaded on first use so that `import bigtrain` stays cheap (no torch, no DeepSpeed).
_API = {
    "fit": "bigtrain.api.training",
    "compose": "bigtrain.api.training",
    "TrainResult": "bigtrain.runtime.run",
    "DistributedTraining": "bigtrain.api.distributed",
    "GPUAcceleratedTraining": "bigtrain.api.distributed",
}
__all__ = list(_API)


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bigtrain' has no attribute {name!r}")
