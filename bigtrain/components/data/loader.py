"""Each rank's share of every global batch, in a seeded order that depends only on the number of
samples already consumed, from one source or a weighted blend of several."""

from dataclasses import dataclass

import torch

from bigtrain.components.data.blend import Blend
from bigtrain.components.data.prepared import IGNORE, Samples
from bigtrain.errors import ConfigError


@dataclass
class BatchPlan:
    """Which stream positions each rank reads at each step.

    The data is one endless stream (blend.py). Global batch `step` is the next `global_batch` positions
    of that stream, and rank r's micro-batch m a contiguous slice of it. The position depends only on
    the number of samples already consumed, so a resumed run, on any number of ranks and with any
    batch shape, reads exactly the samples an uninterrupted one would have read next.
    """

    micro_batch_size: int
    grad_accum: int
    dp_size: int
    dp_rank: int
    start_step: int = 0
    """Step at which `start_sample` samples had been consumed (set on resume)."""
    start_sample: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by all ranks before `step` starts."""
        return self.start_sample + (step - self.start_step) * self.global_batch

    def positions(self, step: int, micro: int, dp_rank: int | None = None) -> list[int]:
        rank = self.dp_rank if dp_rank is None else dp_rank
        start = self.samples_before(step) + (micro * self.dp_size + rank) * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))


class BatchLoader:
    """Micro-batches for one rank, addressed by (step, micro-batch): input_ids, labels and position_ids,
    each [micro_batch_size, seq_len]."""

    def __init__(self, sources: list[Samples], weights: list[float], plan: BatchPlan, seed: int,
                 names: list[str] | None = None, allow_repeats: bool = False):
        if min(len(s) for s in sources) == 0:
            raise ConfigError("A data source has no sample of train.seq_len tokens. Use more data or a smaller "
                              "train.seq_len.")
        self.sources, self.plan = sources, plan
        self.names = names or [str(i) for i in range(len(sources))]
        self.blend = Blend([len(s) for s in sources], weights, seed)
        if len(sources) == 1 and plan.global_batch > len(sources[0]) and not allow_repeats:
            raise ConfigError(
                f"The dataset has {len(sources[0])} sequences, fewer than one global batch "
                f"({plan.global_batch}). Use more data or lower train.micro_batch_size/grad_accum."
            )

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.batch_at(self.plan.positions(step, micro))

    def batch_at(self, positions: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.sources[k].sample(i) for k, i in self.blend.locate(positions)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def step_label_count(self, step: int) -> int:
        """Trained-on tokens in the whole global batch of `step` (every rank's micro-batches): the
        denominator of a loss averaged over tokens. Every rank computes the same number from the data
        alone, so no collective is needed."""
        plan = self.plan
        first = plan.samples_before(step)
        located = self.blend.locate(list(range(first, first + plan.global_batch)))
        return sum(self.sources[k].label_count(i) for k, i in located)

    def samples_by_source(self, step: int) -> dict[str, int]:
        """Samples drawn from each source by all ranks before `step`."""
        counts = self.blend.counts_before(self.plan.samples_before(step))
        return dict(zip(self.names, (int(c) for c in counts)))


def label_positions(labels: torch.Tensor) -> int:
    """Tokens trained on in `labels`, as a causal LM's loss counts them (each position predicts the next)."""
    return int((labels[..., 1:] != IGNORE).sum())

