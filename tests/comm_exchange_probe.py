"""Run bigtrain's compressed exchanges on a fixed sequence of gradients, 2 ranks under torchrun:

    torchrun --nproc_per_node 2 tests/comm_exchange_probe.py STEPS [STEPS ...]

Every rank's gradient at step t is a fixed matrix shared by all ranks plus noise of its own. Rank 0
prints one JSON line: per method and error-feedback setting, after each of the given numbers of
steps, how far the sum of the applied (exchanged) gradients is from the sum of the true mean
gradients; whether the ranks agree; and the bytes one exchange sent according to DeepSpeed's comms
logger.
"""

import json
import sys

import torch

from bigtrain.distributed.process_group import init_distributed, select_accelerator

checkpoints = [int(a) for a in sys.argv[1:]]
steps = max(checkpoints)
select_accelerator("cpu")
ranks = init_distributed(60)
import deepspeed.comm as dist  # noqa: E402

from bigtrain.comm.onebit import OneBitExchange  # noqa: E402
from bigtrain.comm.powersgd import PowerSGDExchange  # noqa: E402
from bigtrain.comm.wire import WireCounter  # noqa: E402

dist.configure(enabled=True, prof_all=True, verbose=False)
SHAPES = [torch.Size([96, 64]), torch.Size([64]), torch.Size([64, 200])]
shared = torch.Generator().manual_seed(0)
signal = [torch.randn(s, generator=shared) for s in SHAPES]
noise = torch.Generator().manual_seed(100 + ranks.rank)
sequence = [[s + torch.randn(s.shape, generator=noise) for s in signal] for _ in range(steps)]
exact_means = []  # the mean over ranks, exactly
for grads in sequence:
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    exact_means.append(flat / ranks.world_size)


def build(method: str, error_feedback: bool):
    if method == "onebit":
        return OneBitExchange([s.numel() for s in SHAPES], ranks.world_size, error_feedback, "cpu")
    return PowerSGDExchange(SHAPES, 2, ranks.world_size, error_feedback, "cpu")


results = {}
counter = WireCounter(ranks.world_size)
for method in ("onebit", "powersgd"):
    for error_feedback in (True, False):
        exchange = build(method, error_feedback)
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
                record["gap"][t] = gap
                record["relative_error"][t] = gap / exact_sum.norm().item()
        rank0 = applied_sum.clone()
        torch.distributed.broadcast(rank0, 0)
        record["ranks_agree"] = bool(torch.equal(rank0, applied_sum))
        record["bytes_per_step"] = sum(sent.values())
        results[f"{method}-{'ef' if error_feedback else 'no_ef'}"] = record
if ranks.rank == 0:
    print(json.dumps({"numel": sum(s.numel() for s in SHAPES), "world_size": ranks.world_size,
                      "results": results}))
torch.distributed.destroy_process_group()
