"""Run bigtrain's compressed exchanges on a fixed sequence of gradients, on every rank of the rank pool:

    report = rank_pool.run(exchange_report, [100, 400])[0]

Every rank's gradient at step t is a fixed matrix shared by all ranks plus noise of its own. Rank 0
returns, per method and error-feedback setting, after each of the given numbers of steps, how far
the sum of the applied (exchanged) gradients is from the sum of the true mean gradients; whether the
ranks agree; and the bytes one exchange sent according to DeepSpeed's comms logger.
"""

import torch

SHAPES = [torch.Size([96, 64]), torch.Size([64]), torch.Size([64, 200])]


def exchange_report(checkpoints: list[int]) -> dict | None:
    import deepspeed.comm as dist
    from deepspeed.comm.comm import comms_logger

    rank, world_size = dist.get_rank(), dist.get_world_size()
    gradients = _gradients(max(checkpoints), rank, world_size)  # the same sequence for every method
    dist.configure(enabled=True, prof_all=True, verbose=False)
    try:
        results = {f"{method}-{'ef' if ef else 'no_ef'}": _follow(method, ef, gradients, checkpoints, world_size)
                   for method in ("onebit", "powersgd") for ef in (True, False)}
    finally:
        comms_logger.__init__()  # the pool's later runs start with the logger as a fresh process has it
    if rank != 0:
        return None
    return {"numel": sum(s.numel() for s in SHAPES), "world_size": world_size, "results": results}


def _gradients(steps: int, rank: int, world_size: int) -> tuple[list, list]:
    """Every step's gradients on this rank, and their exact mean over the ranks."""
    shared = torch.Generator().manual_seed(0)
    signal = [torch.randn(s, generator=shared) for s in SHAPES]
    noise = torch.Generator().manual_seed(100 + rank)
    sequence = [[s + torch.randn(s.shape, generator=noise) for s in signal] for _ in range(steps)]
    exact_means = []
    for grads in sequence:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        exact_means.append(flat / world_size)
    return sequence, exact_means


def _follow(method: str, error_feedback: bool, gradients: tuple[list, list], checkpoints: list[int],
            world_size: int) -> dict:
    from bigtrain.comm.onebit import OneBitExchange
    from bigtrain.comm.powersgd import PowerSGDExchange
    from bigtrain.comm.wire import WireCounter

    sequence, exact_means = gradients
    if method == "onebit":
        exchange = OneBitExchange([s.numel() for s in SHAPES], world_size, error_feedback, "cpu")
    else:
        exchange = PowerSGDExchange(SHAPES, 2, world_size, error_feedback, "cpu")
    counter = WireCounter(world_size)
    applied_sum = torch.zeros(sum(s.numel() for s in SHAPES))
    exact_sum = torch.zeros_like(applied_sum)
    record = {"gap": {}, "relative_error": {}}
    for t, grads in enumerate(sequence, start=1):
        grads = [g.clone() for g in grads]
        counter.discard()
        exchange.reduce(grads)
        sent = counter.collect_step()
        applied_sum += torch.cat([g.reshape(-1) for g in grads])
        exact_sum += exact_means[t - 1]
        if t in checkpoints:
            gap = (applied_sum - exact_sum).norm().item()
            record["gap"][str(t)] = gap
            record["relative_error"][str(t)] = gap / exact_sum.norm().item()
    rank0 = applied_sum.clone()
    torch.distributed.broadcast(rank0, 0)
    record["ranks_agree"] = bool(torch.equal(rank0, applied_sum))
    record["bytes_per_step"] = sum(sent.values())
    return record
