"""CPU use of this rank (psutil) and, on NVIDIA GPUs, utilisation, power and energy (NVML)."""

import logging

import psutil

log = logging.getLogger("bigtrain")


class SystemStats:
    """Sampled at each logged step on rank 0; fields absent where the source is."""

    def __init__(self, device: str, local_rank: int = 0):
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the interval the first reading measures
        self.nvml = _open_nvml(local_rank) if device == "cuda" else None
        self.energy_start_mj = self._energy_mj()

    def sample(self) -> dict[str, float]:
        # CPU use of this process since the last sample, top's convention: 100 = one core busy.
        stats = {"cpu_util": self.process.cpu_percent(None)}
        if self.nvml is not None:
            pynvml, handle = self.nvml
            stats["gpu_util"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            stats["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            energy = self._energy_mj()
            if energy is not None and self.energy_start_mj is not None:
                stats["gpu_energy_j"] = (energy - self.energy_start_mj) / 1000.0
        return stats

    def _energy_mj(self) -> float | None:
        """Energy the GPU used since the driver loaded (Volta and newer), in millijoules."""
        if self.nvml is None:
            return None
        pynvml, handle = self.nvml
        try:
            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except pynvml.NVMLError:
            return None


def _open_nvml(local_rank: int):
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(_physical_index(local_rank))
    except Exception as err:  # no NVML library, no driver access: GPU fields are left out
        log.info("GPU utilisation and power not reported: NVML unavailable (%s)", err)
        return None


def _physical_index(local_rank: int) -> int:
    """NVML counts all GPUs; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v for v in visible.split(",") if v.strip()]
        if local_rank < len(entries) and entries[local_rank].strip().isdigit():
            return int(entries[local_rank])
    return local_rank
