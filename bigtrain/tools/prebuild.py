"""Compile the DeepSpeed C++ ops a run on this machine will load, once, into TORCH_EXTENSIONS_DIR.

Run by `make setup`; without it the first run (and every test session on a fresh machine) would pay
for the build: about 80 s for cpu_adam and 60 s for the CPU shared-memory allreduce.
"""

import time

import bigtrain  # noqa: F401  (sets TORCH_EXTENSIONS_DIR inside the environment)


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print("GPU accelerator: DeepSpeed builds its ops on first use; nothing to prebuild.")
        return
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        start = time.perf_counter()
        accelerator.create_op_builder(name).load(verbose=False)
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
