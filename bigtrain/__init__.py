"""bigtrain: train Hugging Face causal LMs with DeepSpeed, composed from Hydra config groups."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed compiles its C++ ops (cpu_adam, the shared-memory allreduce) on first use. Keeping them
# inside the environment means they are built once per install, by `make setup`, and reused by every
# process and test afterwards; an explicit TORCH_EXTENSIONS_DIR still wins.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
