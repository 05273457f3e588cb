"""Does a collective on DeepSpeed's own data-parallel group time out? Run under torchrun, 2 ranks.

    torchrun --nproc_per_node 2 tests/group_timeout_probe.py TIMEOUT_S

Rank 1 stays away from the collective; rank 0 prints how long it waited before giving up.
"""

import os
import sys
import time

import torch

from bigtrain.distributed.process_group import init_distributed, select_accelerator

timeout_s = float(sys.argv[1])
select_accelerator("cpu")
ranks = init_distributed(timeout_s)
import deepspeed  # noqa: E402
from deepspeed.utils import groups  # noqa: E402

model = torch.nn.Linear(4, 4)
deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
group = groups._get_data_parallel_group()
assert group is not torch.distributed.group.WORLD, "expected DeepSpeed's own group"
if ranks.rank == 1:
    time.sleep(timeout_s + 6)
    os._exit(0)
start = time.monotonic()
try:
    torch.distributed.all_reduce(torch.ones(1), group=group)
    print("no timeout", flush=True)
except RuntimeError:
    print(f"timed out after {time.monotonic() - start:.1f} s", flush=True)
os._exit(0)
