"""The peak TFLOP/s of one device, the denominator of MFU: from the config, a known GPU's datasheet,
or a matmul measured at start-up."""

import functools
import re
import time

import torch

# Dense (no sparsity) tensor-core peaks per device from NVIDIA's datasheets, TFLOP/s. fp32 is the
# plain fp32 rate: torch does not use TF32 for fp32 matmuls unless asked to. First match wins, so
# the more specific names come first.
KNOWN_GPUS: list[tuple[str, dict[str, float]]] = [
    (r"H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
]


def resolve_peak_tflops(configured: float | None, device: str, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure came from)."""
    if configured:
        return float(configured), "logging.peak_tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for pattern, peaks in KNOWN_GPUS:
            if re.search(pattern, name) and precision in peaks:
                return peaks[precision], f"datasheet of {name} ({precision})"
        return measure_matmul_tflops(device, precision), f"measured {precision} matmul on {name}"
    threads = torch.get_num_threads()
    return (measure_matmul_tflops(device, precision),
            f"measured {precision} matmul on the CPU, {threads} thread(s) (this rank's share of the cores)")


def measure_matmul_tflops(device: str, precision: str) -> float:
    """Best of a few square matmuls in the training precision: a fraction of a second on a CPU core.
    Large enough (n=1024 on the CPU) to run at the BLAS library's full rate, small enough to be cheap.
    Measured once per process for each device, precision and thread count: a process that trains run
    after run (the Python API, a sweep) asks the same hardware the same question."""
    where = torch.cuda.current_device() if device == "cuda" else torch.get_num_threads()
    return _measure_matmul_tflops(device, precision, where)


@functools.cache
def _measure_matmul_tflops(device: str, precision: str, where: int) -> float:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n, reps = (8192, 10) if device == "cuda" else (1024 if dtype == torch.float32 else 512, 4)
    # A generator of its own: the run's seeded random stream (only rank 0 measures) stays untouched.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for _ in range(5):  # best of five rounds: other work on the machine only ever slows a round down
        a @ b  # warm-up: first calls pay for allocation and kernel selection
        _sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - started) / reps)
    return 2 * n**3 / best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
