"""An in-process multi-rank harness: N spawned worker processes joined in one gloo process group,
kept across tests, that run whatever function a test sends them on every rank at once.

Tests that need real collectives and a real DeepSpeed engine, but not a launcher, run here: a run
costs its training time only, not the interpreter start, the imports (torch, DeepSpeed,
transformers) and the process-group set-up of a fresh launch. (DeepSpeed's own tests keep a pool
of workers in the same way.) Runs share nothing else: each has its own run dir, and bigtrain's
teardown, which leaves a process group it did not create alone, resets the process-wide state.

    pool = RankPool(2)
    losses = pool.run(train_run, cfg_overrides)     # train_run(...) on rank 0 and rank 1; their results
    pool.start(train_run, cfg_overrides)             # the same, without waiting (pool.poll(), pool.processes)
    losses = pool.collect()
    pool.close()

The function must be importable by the workers (a module-level function of a test module or a
helper module under tests/).
"""

import multiprocessing
import os
import sys
import traceback

from bigtrain.distributed.process_group import free_port

# Longest a sent function may take before the pool is declared stuck (and killed).
DEFAULT_TIMEOUT_S = 600


class RankFailure(AssertionError):
    """A function raised on one or more ranks; the message holds every failing rank's traceback."""


class RankPool:
    def __init__(self, world_size: int = 2, collective_timeout_s: float = 120):
        context = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self.connections = []
        self.processes = []
        port = free_port()
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve, args=(rank, world_size, port, collective_timeout_s, child, list(sys.path)),
                name=f"rank-pool-{rank}", daemon=True,
            )
            process.start()
            self.connections.append(parent)
            self.processes.append(process)
        self.broken = False
        self.running = None  # the name of the function last started
        self.run(_ready)

    def run(self, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
        """`fn(*args)` on every rank at once; the ranks' return values, in rank order."""
        self.start(fn, *args)
        return self.collect(timeout_s)

    def start(self, fn, *args) -> None:
        """Send `fn(*args)` to every rank and return at once; `collect` waits for what they return."""
        if self.broken:
            raise RankFailure("the rank pool is broken by an earlier failure")
        for connection in self.connections:
            connection.send((fn, args))
        self.running = fn.__name__

    def poll(self) -> int | None:
        """As Popen.poll: None while a started function runs on some rank, else 0."""
        return 0 if all(connection.poll() for connection in self.connections) else None

    def collect(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
        """The return values of the function `start` sent, in rank order, once every rank has one."""
        replies = []
        for rank, connection in enumerate(self.connections):
            if not connection.poll(timeout_s):
                self.broken = True
                self.close()
                raise RankFailure(f"rank {rank} did not finish {self.running} within {timeout_s:g} s")
            replies.append(connection.recv())
        failures = [f"--- rank {rank} ---\n{value}" for rank, (ok, value) in enumerate(replies) if not ok]
        if failures:
            raise RankFailure(f"{self.running} failed:\n" + "\n".join(failures))
        return [value for _, value in replies]

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _ready() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _serve(rank: int, world_size: int, port: int, collective_timeout_s: float, connection, path: list[str]):
    sys.path[:] = path
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore",
    )
    from bigtrain.distributed.process_group import init_distributed, select_accelerator

    select_accelerator("cpu")
    init_distributed(collective_timeout_s)
    while True:
        message = connection.recv()
        if message is None:
            break
        fn, args = message
        try:
            connection.send((True, fn(*args)))
        except BaseException:  # noqa: BLE001 - the test gets every rank's traceback
            connection.send((False, traceback.format_exc()))
