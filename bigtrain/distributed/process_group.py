"""Process-group setup for every launcher: deepspeed, torchrun, SLURM-style env, or a plain python process."""

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """Rank layout as set by the launcher; one process when no launcher set it."""
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def select_accelerator(device: str) -> None:
    """Make DeepSpeed use the device the config resolved to (it auto-detects otherwise), and on the
    CPU give each local rank its share of the cores: the deepspeed launcher leaves every rank using
    all of them, and ranks fighting over cores run slower than one rank per core."""
    if device != "cpu":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def init_distributed(timeout_s: float) -> Ranks:
    """Join (or, for a lone process, create) the default process group through DeepSpeed.

    DeepSpeed picks the backend from the accelerator: NCCL on GPUs, gloo on the CPU.
    """
    ranks = ranks_from_env()
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m bigtrain.train`
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 still calls these torch collectives by their deprecated names, once per step.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
        category=FutureWarning,
    )
    bound_group_timeouts(timedelta(seconds=timeout_s))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(ranks.local_rank)
    else:
        unlink_shm_workspace(ranks.rank)
    return ranks


def unlink_shm_workspace(rank: int) -> None:
    """Remove this rank's name for DeepSpeed's shared-memory all-reduce buffer; the mapping stays.

    On the CPU, DeepSpeed's shm comm op gives every rank a 69 MB segment in /dev/shm and never
    unlinks it, so each run, finished or killed, leaves them behind in RAM. Once every rank has
    mapped its peers' segments (they are mapped inside init_distributed, hence the barrier), the
    names are no longer needed, and unlinking them now means the kernel frees the memory when the
    processes exit, however they exit.
    """
    import torch.distributed as dist

    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    dist.barrier()
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:  # no shm op on this machine, or not a single-node job
        pass


# Rank 0 alone tokenizes a dataset, converts a checkpoint or hashes a large one while the others
# wait; such waits may legitimately outlast fault.collective_timeout_s. The watchdog still ends the
# job if rank 0 dies or stops answering meanwhile.
LONG_WAIT = timedelta(hours=6)
_long_wait_group = None


def long_wait_group():
    """A gloo group over all ranks for waiting on one rank's long, legitimate work (CPU tensors)."""
    global _long_wait_group
    if _long_wait_group is None:
        import torch.distributed as dist

        _long_wait_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return _long_wait_group


def forget_long_wait_group() -> None:
    """Drop the cached group once the process groups are destroyed; a later run makes its own."""
    global _long_wait_group
    _long_wait_group = None


def is_peer_failure(err: RuntimeError) -> bool:
    """A collective that failed because another rank is gone or silent (gloo reports these as plain
    RuntimeErrors: "Timed out waiting ... for recv", "Connection closed by peer")."""
    import torch.distributed

    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Timed out waiting")
    )


def bound_group_timeouts(timeout: timedelta) -> None:
    """Give every process group created from now on `timeout`, not torch's default.

    DeepSpeed creates its data-parallel (and other) groups without a timeout, so on gloo they wait
    30 minutes for a dead or stopped peer whatever timeout the default group was given. torch reads
    the default for new groups from this one function, so replacing it bounds them all.
    """
    import torch.distributed.distributed_c10d as c10d

    c10d._get_default_timeout = lambda backend: timeout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
