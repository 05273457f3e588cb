"""The process grid: world = data x pipeline x tensor, and where each rank sits in it.

bigtrain does not lay ranks out itself; it follows the grids DeepSpeed builds, so that its data
loader hands every rank the slice its data-parallel group expects:
- pipeline (PipelineModule's PipeDataParallelTopology, axes pipe x data): data varies fastest;
- tensor (AutoTP's device mesh, axes data x tensor): tensor varies fastest, so the ranks of one
  tensor group are neighbours (on one node, where their frequent collectives are cheapest).
"""

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class ProcessGrid:
    data: int
    pipeline: int
    tensor: int

    @classmethod
    def of(cls, cfg: DictConfig, world_size: int) -> "ProcessGrid":
        """The grid of a job of `world_size` processes: the data-parallel degree is what the model-
        parallel degrees leave (the one place it is computed)."""
        pp, tp = cfg.parallel.pipeline, cfg.parallel.tensor
        return cls(data=world_size // (pp * tp), pipeline=pp, tensor=tp)

    @property
    def world_size(self) -> int:
        return self.data * self.pipeline * self.tensor

    def data_rank(self, rank: int) -> int:
        """The data-parallel group index of `rank`: which slice of each global batch it reads."""
        if self.pipeline > 1:
            return rank % self.data
        return rank // self.tensor

    def describe(self) -> str:
        return f"data {self.data} x pipeline {self.pipeline} x tensor {self.tensor}"
