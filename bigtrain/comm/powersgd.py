"""PowerSGD gradient exchange (Vogels et al., 2019): each gradient matrix M, averaged over ranks, is
replaced by its rank-r approximation P Q^T from one step of power iteration, warm-started from the
previous step's Q, with error feedback. Per matrix a rank all-reduces n r + m r values instead of
n m. Tensors too small to gain (biases, norms) are all-reduced as they are.

The algorithm follows torch's DDP hook (torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook),
whose orthogonalisation and compress-or-not rule are reused; the hook itself works on DDP's gradient
buckets, so the exchange is written here for the engine's parameter gradients.
"""

import torch
from deepspeed import comm as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize, _should_compress

# Compress a matrix only if that cuts its bytes by more than this (torch's default).
MIN_COMPRESSION_RATE = 2
# Keeps the orthogonalisation finite when a matrix's gradient is all zeros.
EPSILON = 1e-8
SEED = 0  # the same random Q on every rank


def plan_compression(shapes: list[torch.Size], low_rank: int) -> list[tuple[int, int, int] | None]:
    """For each tensor shape: (rows, cols, rank) of the matrix to compress, or None to send as is."""
    plan = []
    for shape in shapes:
        if len(shape) < 2:
            plan.append(None)
            continue
        rows = shape[0]
        cols = shape.numel() // rows
        rank = min(rows, cols, low_rank)
        plan.append((rows, cols, rank) if _should_compress(rows, cols, rank, MIN_COMPRESSION_RATE)[0] else None)
    return plan


def compressed_numel(shapes: list[torch.Size], low_rank: int) -> int:
    """Values a rank all-reduces per step: n r + m r per compressed matrix, every value of the rest."""
    return sum(
        shape.numel() if entry is None else (entry[0] + entry[1]) * entry[2]
        for shape, entry in zip(shapes, plan_compression(shapes, low_rank))
    )


class PowerSGDExchange:
    """Averages the gradients of all ranks through low-rank approximations."""

    def __init__(self, shapes: list[torch.Size], low_rank: int, world_size: int, error_feedback: bool, device):
        self.world_size = world_size
        self.plan = plan_compression(shapes, low_rank)
        self.matrices = [(i, entry) for i, entry in enumerate(self.plan) if entry is not None]
        self.plain = [i for i, entry in enumerate(self.plan) if entry is None]
        self.errors = (
            [torch.zeros(rows, cols, device=device) for _, (rows, cols, _) in self.matrices]
            if error_feedback else None
        )
        self.p_flat = torch.empty(sum(rows * rank for _, (rows, _, rank) in self.matrices), device=device)
        self.q_flat = torch.empty(sum(cols * rank for _, (_, cols, rank) in self.matrices), device=device)
        self.ps = _views(self.p_flat, [(rows, rank) for _, (rows, _, rank) in self.matrices])
        self.qs = _views(self.q_flat, [(cols, rank) for _, (_, cols, rank) in self.matrices])
        generator = torch.Generator().manual_seed(SEED)
        self.q_flat.copy_(torch.randn(self.q_flat.numel(), generator=generator))

    def after_step(self, step: int) -> None:
        pass

    def reduce(self, grads: list[torch.Tensor]) -> None:
        """Replace every rank's `grads` by the (approximated) mean over ranks, in place."""
        if self.plain:
            flat = torch.cat([grads[i].reshape(-1) for i in self.plain])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for i in self.plain:
                grads[i].copy_(flat[offset: offset + grads[i].numel()].view_as(grads[i]))
                offset += grads[i].numel()
        if not self.matrices:
            return

        inputs = []
        for k, (i, (rows, cols, _)) in enumerate(self.matrices):
            m = grads[i].view(rows, cols)
            inputs.append(m + self.errors[k] if self.errors is not None else m.clone())
            _orthogonalize(self.qs[k].unsqueeze(0), EPSILON)  # warm start: last step's Q
            torch.mm(inputs[k], self.qs[k], out=self.ps[k])
        dist.all_reduce(self.p_flat)  # sum over ranks of M_i Q
        for k, m in enumerate(inputs):
            _orthogonalize(self.ps[k].unsqueeze(0), EPSILON)
            torch.mm(m.t(), self.ps[k], out=self.qs[k])
        dist.all_reduce(self.q_flat)
        self.q_flat.div_(self.world_size)  # Q = mean(M)^T P, also the next step's warm start
        for k, (i, _) in enumerate(self.matrices):
            approx = self.ps[k] @ self.qs[k].t()  # P P^T mean(M): the mean projected onto span(P)
            if self.errors is not None:
                torch.sub(inputs[k], approx, out=self.errors[k])
            grads[i].copy_(approx.view_as(grads[i]))


def _views(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(flat[offset: offset + rows * cols].view(rows, cols))
        offset += rows * cols
    return views
