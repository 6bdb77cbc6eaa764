"""Handing out the training windows: the sharded batch samplers.

``WindowBatchSampler`` (sources mixed by size) draws one permutation per epoch (seeded with
``seed + epoch``), cut into consecutive blocks of ``batch_size``, block ``k * W + r`` to rank
``r``'s ``k``-th micro-batch. ``MixtureBatchSampler`` (weighted sources) fills the same blocks
from the mixture's stream of slots (``data.mixture``), block ``b`` of the run being slots
``b * batch_size ...``. Either way W processes with accumulation A see, in every optimiser step,
exactly the windows that one process with accumulation W * A sees, in the same micro-batches,
and a position (epoch, micro-batches used) is all a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..data.mixture import Mixture
from .data import TrainingDataError


class WindowBatchSampler:
    """Seeded per-epoch shuffling of windows into micro-batches, sharded over ranks.

    Every epoch draws one permutation (``seed + epoch``) of the windows, cuts it into
    consecutive blocks of ``batch_size`` and gives block ``k * num_replicas + rank`` to this
    rank's ``k``-th micro-batch; the tail that does not fill a block on every rank is dropped.

    Args:
        num_windows: Windows in the dataset.
        batch_size: Windows per micro-batch (per rank).
        num_replicas: Processes (world size).
        rank: This process.
        seed: Base seed of the permutations.
        shuffle: Permute (else the windows go in order).
    """

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0
        self.num_batches = num_windows // (batch_size * num_replicas)
        if self.num_batches == 0:
            raise TrainingDataError(
                f"The training data has {num_windows} windows, fewer than one global batch of "
                f"batch_size={batch_size} x {num_replicas} processes; add text, lower "
                "batch_size or seq_len."
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; ``skip`` micro-batches already used (resume)."""
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_windows, generator=generator)
        else:
            order = torch.arange(self.num_windows)
        for k in range(self.skip, self.num_batches):
            block = k * self.num_replicas + self.rank
            yield order[block * self.batch_size : (block + 1) * self.batch_size].tolist()


class MixtureBatchSampler(WindowBatchSampler):
    """Micro-batches of a weighted mixture, sharded over ranks like ``WindowBatchSampler``.

    An epoch is as many steps as the corpus has windows (``num_windows`` over the global
    batch); rank ``r``'s ``k``-th micro-batch of epoch ``e`` is block
    ``(e * num_batches + k) * num_replicas + r`` of the mixture's stream.

    Args:
        mixture: The mixture's layout.
        offsets: First global window index of each source (``TrainingData.offsets``).
        batch_size, num_replicas, rank: As ``WindowBatchSampler``.
        accumulate: Micro-batches per optimiser step (epochs end on a step).
    """

    def __init__(self, mixture: Mixture, offsets: Sequence[int], batch_size: int,
                 num_replicas: int = 1, rank: int = 0, accumulate: int = 1) -> None:  # fmt: skip
        super().__init__(int(offsets[-1]), batch_size, num_replicas, rank, mixture.seed, True)
        self.mixture, self.offsets = mixture, [int(o) for o in offsets]
        self.num_batches = self.num_batches // accumulate * accumulate

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.skip, self.num_batches):
            block = (self.epoch * self.num_batches + k) * self.num_replicas + self.rank
            batch = []
            for slot in range(block * self.batch_size, (block + 1) * self.batch_size):
                source, window = self.mixture.window(slot)
                batch.append(self.offsets[source] + window)
            yield batch
