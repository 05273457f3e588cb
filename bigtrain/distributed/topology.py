"""The process grid: world = data x pipeline x tensor, and where each rank sits in it.

bigtrain does not lay ranks out itself; it follows the grids DeepSpeed builds, so that its data
loader hands every rank the slice its data-parallel group expects:
- pipeline (PipelineModule's PipeDataParallelTopology, axes pipe x data): data varies fastest;
- tensor (AutoTP's device mesh, axes data x tensor): tensor varies fastest, so the ranks of one
  tensor group are neighbours (on one node, where their frequent collectives are cheapest);
- sequence (Ulysses, axes data x sequence): the ranks of a sequence group are consecutive.
Sequence parallelism combines with data parallelism only (validation refuses the rest).
"""

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class ProcessGrid:
    data: int
    pipeline: int
    tensor: int
    sequence: int = 1

    @classmethod
    def of(cls, cfg: DictConfig, world_size: int) -> "ProcessGrid":
        """The grid of a job of `world_size` processes: the data-parallel degree is what the model-
        parallel degrees leave (the one place it is computed)."""
        pp, tp, sp = cfg.parallel.pipeline, cfg.parallel.tensor, cfg.parallel.sequence
        return cls(data=world_size // (pp * tp * sp), pipeline=pp, tensor=tp, sequence=sp)

    @property
    def world_size(self) -> int:
        return self.data * self.pipeline * self.tensor * self.sequence

    @property
    def zero_partitions(self) -> int:
        """Ranks ZeRO shards the optimizer over: the data ranks, and under Ulysses the sequence ranks too."""
        return self.data * self.sequence

    def data_rank(self, rank: int) -> int:
        """The data-parallel group index of `rank`: which slice of each global batch it reads."""
        if self.pipeline > 1:
            return rank % self.data
        return rank // (self.tensor * self.sequence)

    def describe(self) -> str:
        text = f"data {self.data} x pipeline {self.pipeline} x tensor {self.tensor}"
        return text + (f" x sequence {self.sequence}" if self.sequence > 1 else "")
