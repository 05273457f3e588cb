"""Checks of a config against the machine it is checked on: the GPUs it has, and the toolkits and
libraries the chosen features build or import there. Skipped when a config is checked for another
machine (`bigtrain config --device cuda`)."""

import ctypes.util
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

from omegaconf import DictConfig

from bigtrain.config.derived import resolve_device
from bigtrain.errors import ConfigError


def check_machine(cfg: DictConfig, world_size: int, local_ranks: int | None = None) -> None:
    """`local_ranks`: the job's ranks on this machine where the caller knows them (a hostfile's slots for
    this node); else the launcher's count, else all `world_size` of them."""
    device = resolve_device(cfg)
    if device == "cuda":
        _check_gpus(cfg, world_size, local_ranks)
        _check_cuda_toolkit(cfg)
    if cfg.model.attn_implementation.startswith("flash_attention") and not _flash_attention_installed(cfg):
        raise ConfigError(
            f"model.attn_implementation={cfg.model.attn_implementation} needs the flash-attn package (or the "
            "kernels package for flash_attention_3/4), which is not installed here, so every rank would fail "
            "when the model is built. Install it on a GPU machine (pip install flash-attn --no-build-isolation), "
            "or use model.attn_implementation=sdpa (PyTorch's fused attention, no extra package)."
        )
    if "nvme" in (cfg.offload.optimizer, cfg.offload.param) and not has_libaio():
        raise ConfigError(
            "NVMe offload needs libaio (DeepSpeed's async_io op is compiled against it on first use), "
            "and neither libaio.h nor libaio.so was found. Install it (Debian/Ubuntu: apt-get install "
            "libaio-dev; RHEL: dnf install libaio-devel; `make setup` does this when run as root), or "
            "use offload=full to offload to CPU memory instead."
        )
    if cfg.precision.name == "bf16" and device == "cpu" and not cpu_has_bf16_units():
        warnings.warn(
            "precision=bf16 on a CPU without bf16 units: bf16 math is emulated and will be very "
            "slow (often 10-100x slower than fp32). Use precision=fp32 on this machine.",
            stacklevel=3,
        )


def _check_gpus(cfg: DictConfig, world_size: int, local_ranks: int | None = None) -> None:
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ConfigError(
            f"train.device={cfg.train.device} asks for a GPU, but torch sees none here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}). Use train.device=cpu (or auto) on this machine, or "
            "check the config for a GPU machine with `bigtrain config --device cuda`."
        )
    # Ranks on this node: the caller's count (a multi-node launch check), else the launcher's (torchrun
    # sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE); before a launch, every rank is local.
    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    if local > visible:
        raise ConfigError(
            f"{local} ranks on this node train on GPUs, one each, but {visible} GPU(s) are visible here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): rank {visible} would fail "
            f"with 'invalid device ordinal'. Launch at most {visible} ranks per node (--num_gpus, --nproc_per_node, "
            "slots=), or make more GPUs visible."
        )


def _check_cuda_toolkit(cfg: DictConfig) -> None:
    """DeepSpeed compiles its NVMe (async_io) and ZeRO++ quantizer ops from CUDA sources on a GPU."""
    needs = []
    if "nvme" in (cfg.offload.optimizer, cfg.offload.param):
        needs.append(f"offload={cfg.offload.name} (DeepSpeed's async_io op)")
    if cfg.comm.name == "zeropp" and (cfg.comm.quantized_weights or cfg.comm.quantized_gradients):
        needs.append("comm=zeropp's quantization (DeepSpeed's quantizer op)")
    if needs and not cuda_toolkit():
        raise ConfigError(
            f"{' and '.join(needs)} is compiled by DeepSpeed from CUDA sources on first use, which needs the CUDA "
            "toolkit (nvcc), and none was found (CUDA_HOME unset or without bin/nvcc, no nvcc on PATH). Install "
            "the toolkit matching torch's CUDA version (e.g. apt-get install cuda-toolkit-12-8, or conda install "
            "-c nvidia cuda-nvcc) and set CUDA_HOME, or choose offload=full / comm=zeropp_hpz, which need no build."
        )


def cuda_toolkit() -> str | None:
    """Where nvcc is: $CUDA_HOME/bin/nvcc, else on PATH; None without a CUDA toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _flash_attention_installed(cfg: DictConfig) -> bool:
    if cfg.model.attn_implementation == "flash_attention_2":
        return importlib.util.find_spec("flash_attn") is not None
    return importlib.util.find_spec("kernels") is not None or importlib.util.find_spec("flash_attn_interface") is not None


def has_libaio() -> bool:
    include_dirs = ["/usr/include", "/usr/local/include"]
    if "CONDA_PREFIX" in os.environ:
        include_dirs.append(os.path.join(os.environ["CONDA_PREFIX"], "include"))
    has_header = any(Path(d, "libaio.h").exists() for d in include_dirs)
    return has_header and ctypes.util.find_library("aio") is not None


def cpu_has_bf16_units() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
