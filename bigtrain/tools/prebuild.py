"""Compile the DeepSpeed C++ ops a CPU run loads, once, into TORCH_EXTENSIONS_DIR.

Run by `make setup`; without it the first run (and every test session on a fresh machine) would pay
for the build: about 80 s for cpu_adam and 60 s for the CPU shared-memory allreduce. They are built
on GPU machines too: the test suite trains on the CPU everywhere (DS_ACCELERATOR=cpu), and CPU ranks
load them there as here. GPU ops are built by DeepSpeed on first use (and need the CUDA toolkit).
"""

import os
import subprocess
import sys
import time

import bigtrain  # noqa: F401  (sets TORCH_EXTENSIONS_DIR inside the environment)

CPU_OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def main() -> None:
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        # DeepSpeed picks its accelerator once per process: build the CPU ops in one that uses the CPU's.
        sys.exit(subprocess.run([sys.executable, "-m", "bigtrain.tools.prebuild"],
                                env=dict(os.environ, DS_ACCELERATOR="cpu")).returncode)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in CPU_OPS:
        start = time.perf_counter()
        accelerator.create_op_builder(name).load(verbose=False)
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
