"""Process-group setup for every launcher: deepspeed, torchrun, SLURM-style env, or a plain python process."""

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

from bigtrain.errors import ConfigError


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
    values = {}
    for key, name, default in (("rank", "RANK", "0"), ("local_rank", "LOCAL_RANK", "0"), ("world_size", "WORLD_SIZE", "1")):
        text = os.environ.get(name, default)
        if not text.strip().isdigit():
            raise ConfigError(
                f"The environment variable {name}={text!r} is not a whole number. It is set by the launcher "
                "(deepspeed, torchrun, SLURM); unset it to run one process, or launch through one of those."
            )
        values[key] = int(text)
    if values["world_size"] < 1 or values["rank"] >= values["world_size"]:
        raise ConfigError(f"RANK={values['rank']} and WORLD_SIZE={values['world_size']} do not describe a job: "
                          "WORLD_SIZE must be 1 or more and RANK below it. Unset them to run one process.")
    return Ranks(**values)


def select_accelerator(device: str, optimizer_on_cpu: bool = False) -> None:
    """Make DeepSpeed use the device the config resolved to (it auto-detects otherwise), and give each
    local rank its share of the cores wherever ranks compute on the CPU (CPU training, or the optimizer
    step offloaded to the CPU from GPUs): the launchers leave every rank using all of them, and eight
    ranks' CPU Adam each using every core run slower than one core set each."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if (device == "cpu" or optimizer_on_cpu) and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(cpu_share())


def cpu_share() -> int:
    """This rank's share of the machine's cores: all of them over the ranks on this node."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local_ranks)


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
    set_network_defaults(os.environ)
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


def set_network_defaults(env) -> None:
    """Environment defaults for the collectives, where the user set none:
    - GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME: GPU jobs use gloo too (bigtrain's long waits,
      checkpoint decisions), and without it gloo binds wherever the host name resolves (often
      127.0.1.1), which other nodes cannot reach. Only plain interface names carry over (NCCL's
      `^docker,lo` exclusions and `=eth0` exact matches mean nothing to gloo).
    - TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (clean up only): a timed-out or failed NCCL collective aborts its
      communicators and raises in the rank, which then exits with bigtrain's lost-peer code (5), as on
      gloo; torch's default (3) aborts the whole process (SIGABRT, exit code 134)."""
    nccl_interfaces = env.get("NCCL_SOCKET_IFNAME", "")
    if nccl_interfaces and "GLOO_SOCKET_IFNAME" not in env and not nccl_interfaces.startswith(("^", "=")):
        env["GLOO_SOCKET_IFNAME"] = nccl_interfaces
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env and "NCCL_ASYNC_ERROR_HANDLING" not in env:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"


def decided_by_rank0(decide):
    """Rank 0 runs `decide()`; every rank gets its result, or raises the BigtrainError it raised (so all
    ranks stop together, with the same message). On the long-wait group: the decision may take long."""
    import torch.distributed as dist

    from bigtrain.errors import BigtrainError

    decision = [None]
    if dist.get_rank() == 0:
        try:
            decision[0] = decide()
        except BigtrainError as err:
            decision[0] = err
    dist.broadcast_object_list(decision, src=0, group=long_wait_group())
    if isinstance(decision[0], BigtrainError):
        raise decision[0]
    return decision[0]


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
