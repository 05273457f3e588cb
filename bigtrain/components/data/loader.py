"""Each rank's share of every global batch, in a seeded order that depends only on the number of
samples already consumed."""

from dataclasses import dataclass, field

import torch
from datasets import Dataset

from bigtrain.errors import ConfigError


@dataclass
class BatchPlan:
    """Which packed blocks each rank reads at each step.

    The data is one endless stream of blocks: epoch e is a permutation of all blocks seeded by
    (seed, e). Global batch `step` is the next `global_batch` positions of that stream, and rank r's
    micro-batch m a contiguous slice of it. The position depends only on the number of samples
    already consumed, so a resumed run, on any number of ranks and with any batch shape, reads
    exactly the blocks an uninterrupted one would have read next.
    """

    num_blocks: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    dp_rank: int
    seed: int
    start_step: int = 0
    """Step at which `start_sample` samples had been consumed (set on resume)."""
    start_sample: int = 0
    _cached_epoch: int = field(default=-1, init=False, repr=False)
    _cached_order: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.global_batch > self.num_blocks:
            raise ConfigError(
                f"The dataset has {self.num_blocks} sequences, fewer than one global batch "
                f"({self.global_batch}). Use more data or lower train.micro_batch_size/grad_accum."
            )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by all ranks before `step` starts."""
        return self.start_sample + (step - self.start_step) * self.global_batch

    def indices(self, step: int, micro: int) -> list[int]:
        start = self.samples_before(step) + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        return [self._block_at(position) for position in range(start, start + self.micro_batch_size)]

    def _block_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if self._cached_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_order = torch.randperm(self.num_blocks, generator=generator)
            self._cached_epoch = epoch
        return int(self._cached_order[offset])


class BatchLoader:
    """Micro-batches of token ids for one rank, addressed by (step, micro-batch)."""

    def __init__(self, dataset: Dataset, plan: BatchPlan):
        self.dataset = dataset
        self.plan = plan

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        return self.dataset[self.plan.indices(step, micro)]["input_ids"]
