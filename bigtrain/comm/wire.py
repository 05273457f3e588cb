"""Bytes each rank sends per training step, from DeepSpeed's comms logger.

The logger records every collective that goes through `deepspeed.comm` (DeepSpeed's own and
bigtrain's exchanges alike) with the size of the tensor handed to it: element count x element size.
What a rank then puts on the wire depends on the collective; the factors are those of the
bandwidth-optimal (ring) algorithms, as in NCCL's bus bandwidth and DeepSpeed's `calc_bw_log`. With
2 ranks every factor is 1 except reduce-scatter and all-to-all, which keep half of their input.

Every collective is assumed to span all ranks, which holds for pure data parallelism. (ZeRO++'s hpZ
gathers within a node and is counted as if it spanned the job.)
"""

from collections import defaultdict


def bytes_sent(op: str, msg_size: int, world_size: int) -> float:
    """Bytes one rank sends for collective `op` handed a tensor of `msg_size` bytes."""
    w = world_size
    if w <= 1:
        return 0.0
    if op in ("all_reduce", "all_reduce_coalesced", "inference_all_reduce"):
        return msg_size * 2 * (w - 1) / w  # reduce-scatter, then all-gather, of the whole tensor
    if op in ("all_gather", "all_gather_into_tensor"):
        return msg_size * (w - 1)  # the logged size is this rank's shard; it reaches w - 1 peers
    if op in ("reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single"):
        return msg_size * (w - 1) / w  # every part but the rank's own leaves it
    if op == "barrier":
        return 0.0
    return float(msg_size)  # broadcast, reduce, gather, scatter, send: the tensor crosses once


class WireCounter:
    """Reads and clears DeepSpeed's comms logger, step by step; keeps a running window for metrics."""

    def __init__(self, world_size: int):
        from deepspeed.comm.comm import comms_logger

        self.logger = comms_logger
        self.world_size = world_size
        self.window_bytes: dict[str, float] = defaultdict(float)
        self.window_steps = 0

    def discard(self) -> None:
        """Forget what was logged so far (start-up, checkpoints, the previous step's logging)."""
        self.logger.reset_data()

    def collect_step(self) -> dict[str, float]:
        """Bytes sent since the last discard, by collective; added to the window and cleared."""
        by_op: dict[str, float] = defaultdict(float)
        for op, sizes in self.logger.get_raw_data().items():
            for msg_size, record in sizes.items():
                by_op[op] += record[0] * bytes_sent(op, msg_size, self.world_size)
        self.logger.reset_data()
        for op, sent in by_op.items():
            self.window_bytes[op] += sent
        self.window_steps += 1
        return dict(by_op)

    def take_window(self) -> dict[str, float] | None:
        """Mean bytes per step by collective over the steps since the last call; None if none."""
        if not self.window_steps:
            return None
        mean = {op: sent / self.window_steps for op, sent in sorted(self.window_bytes.items())}
        self.window_bytes.clear()
        self.window_steps = 0
        return mean
