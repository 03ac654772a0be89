"""Deterministic, resumable sampling of the trainer's batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import torch

__all__ = ["EpochSampler", "shard"]


@dataclass
class EpochSampler:
    """Indices of batch ``k`` of a shuffled, epoch-based stream, as a pure function of ``k``.

    Epoch ``e`` is ``randperm(n, generator=seed + e)``; batches of ``batch_size`` are drawn in
    order and may span epoch boundaries. The data position is just the batch counter, so a run
    resumed at step ``k`` sees exactly the batches an uninterrupted run would.
    """

    n: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError("EpochSampler: the data set is empty")
        self._cache: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def batch(self, k: int) -> List[int]:
        out = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, pos = divmod(j, self.n)
            out.append(int(self._perm(epoch)[pos]))
        return out

    def batches(self, start: int) -> Iterator[List[int]]:
        k = start
        while True:
            yield self.batch(k)
            k += 1


def shard(indices: Sequence[int], *, rank: int, world_size: int) -> List[int]:
    """The contiguous slice of a global batch that process ``rank`` handles."""
    n = len(indices)
    if n % world_size:
        raise ValueError(f"global batch {n} is not divisible by the world size {world_size}")
    per = n // world_size
    return list(indices[rank * per: (rank + 1) * per])
