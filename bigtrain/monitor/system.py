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
        handle = nvml_handle(pynvml, local_rank)
        log.info("GPU use and power sampled on %s (%s)", _text(pynvml.nvmlDeviceGetName(handle)),
                 _text(pynvml.nvmlDeviceGetUUID(handle)))
        return pynvml, handle
    except Exception as err:  # no NVML library, no driver access: GPU fields are left out
        log.info("GPU utilisation and power not reported: NVML unavailable (%s)", err)
        return None


def nvml_handle(pynvml, local_rank: int):
    """NVML's handle for the GPU torch calls cuda:`local_rank`. NVML counts every GPU of the machine;
    CUDA_VISIBLE_DEVICES picks and renumbers them for torch, by index or by UUID (GPU-..., MIG-...)."""
    import os

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if local_rank < len(visible):
        entry = visible[local_rank]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(local_rank)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
