"""A weighted blend of sample sources, as one endless stream addressed by position.

Position p of the stream takes its sample from source k, chosen by a low-discrepancy sequence: the
fractional part of p / golden ratio (shifted by the seed) falls into source k's share of [0, 1). Over
any stretch of n positions every source gets its weight's share within a few samples (a golden-ratio
sequence is spread more evenly than random draws), and the choice depends only on the seed and the
position. Within a source, the j-th sample it is asked for is the j-th of its endless epochs, each a
seeded permutation of its samples. So a resumed run, on any number of ranks, reads exactly what an
uninterrupted one would read next.
"""

import math

import numpy as np
import torch

INVERSE_GOLDEN = (math.sqrt(5) - 1) / 2
CHUNK = 1 << 20  # positions counted at a time when catching up


class Blend:
    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        total = float(sum(weights))
        self.sizes = list(sizes)
        self.cumulative = np.cumsum([w / total for w in weights])
        self.cumulative[-1] = 1.0
        self.seed = seed
        self.offset = (seed * INVERSE_GOLDEN) % 1.0
        self._counted_to = 0  # positions [0, _counted_to) are counted in _counts
        self._counts = np.zeros(len(sizes), dtype=np.int64)
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def sources_of(self, positions: np.ndarray) -> np.ndarray:
        u = (positions.astype(np.float64) * INVERSE_GOLDEN + self.offset) % 1.0
        return np.searchsorted(self.cumulative, u, side="right").clip(max=len(self.sizes) - 1)

    def counts_before(self, position: int) -> np.ndarray:
        """Samples taken from each source by positions [0, position)."""
        if position < self._counted_to:  # an earlier position (a new reader): count from the start
            self._counted_to, self._counts = 0, np.zeros_like(self._counts)
        while self._counted_to < position:
            stop = min(position, self._counted_to + CHUNK)
            sources = self.sources_of(np.arange(self._counted_to, stop))
            self._counts += np.bincount(sources, minlength=len(self.sizes))
            self._counted_to = stop
        return self._counts.copy()

    def locate(self, positions: list[int]) -> list[tuple[int, int]]:
        """(source, sample index in it) of each position (ascending positions, as a rank reads them)."""
        first = positions[0]
        counts = self.counts_before(first)
        span = np.arange(first, positions[-1] + 1)
        sources = self.sources_of(span)
        # For each position, how many earlier positions of the same source lie in [first, position).
        seen = np.zeros((len(span), len(self.sizes)), dtype=np.int64)
        np.add.at(seen, (np.arange(len(span)), sources), 1)
        before = np.cumsum(seen, axis=0) - seen
        located = []
        for p in positions:
            i = p - first
            k = int(sources[i])
            located.append((k, self._sample_at(k, int(counts[k] + before[i, k]))))
        return located

    def _sample_at(self, source: int, draw: int) -> int:
        size = self.sizes[source]
        epoch, offset = divmod(draw, size)
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.sizes):
                self._orders.clear()
            # One source keeps the stream bigtrain has always used: a permutation seeded by (seed, epoch).
            seed = self.seed * 1_000_003 + epoch + source * 7_919_000_003
            self._orders[key] = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        return int(self._orders[key][offset])
