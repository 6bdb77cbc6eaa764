"""Weighted mixtures of sources: which window fills each slot of the sample stream (pure math).

The stream of global samples (slot ``n`` = the ``n``-th window the run trains on, counted over
all processes and micro-batches) is cut into periods of ``P`` slots, ``P`` a multiple of the
global batch. Within a period the slots are dealt to the sources by a weighted fair queue
(Sainte-Laguë: the ``k``-th slot of source ``s`` sits at time ``(k + 1/2) / w_s``), so every
source gets ``round(w_s * P)`` slots per period, spread evenly. Slot ``n`` is then the
``j``-th draw of its source, and draw ``j`` is position ``j mod N_s`` of that source's
permutation number ``j div N_s`` (seeded by ``(seed, source, epoch)``): a small source repeats
(whole epochs, each reshuffled), a large one is subsampled. Everything is a function of ``n``
alone, so any process finds the windows of any step without state, and a resumed run needs
only its position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_PERIOD = 4096
"""Slots per period at least: shares are exact to within 1/P per period."""


@dataclass(frozen=True)
class Mixture:
    """The period's layout: ``source[i]`` fills slot ``i`` as its ``rank[i]``-th draw.

    Attributes:
        windows: Windows per source (``N_s``).
        quota: Slots per period of each source.
        source: The source of each slot of a period.
        rank: How many slots of the same source precede it in the period.
        seed: Seed of the per-source permutations.
    """

    windows: tuple[int, ...]
    quota: tuple[int, ...]
    source: np.ndarray
    rank: np.ndarray
    seed: int
    _perms: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, compare=False)

    @property
    def period(self) -> int:
        """Slots per period."""
        return len(self.source)

    def draw(self, slot: int) -> tuple[int, int]:
        """(source, draw number within that source) of global slot ``slot``."""
        cycle, i = divmod(slot, self.period)
        s = int(self.source[i])
        return s, cycle * self.quota[s] + int(self.rank[i])

    def window(self, slot: int) -> tuple[int, int]:
        """(source, window of that source) that fills global slot ``slot``."""
        s, draw = self.draw(slot)
        epoch, position = divmod(draw, self.windows[s])
        return s, int(self._permutation(s, epoch)[position])

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.windows):  # keep the current epochs only
                self._perms.clear()
            sequence = np.random.SeedSequence([self.seed, s, epoch])
            self._perms[key] = np.random.Generator(np.random.PCG64(sequence)).permutation(
                self.windows[s]
            )
        return self._perms[key]


def make_mixture(
    weights: Sequence[float], windows: Sequence[int], global_batch: int, seed: int
) -> Mixture:
    """Lay out one period for ``weights`` (normalised here) over sources of ``windows``.

    Raises:
        ValueError: For a weight so small that its source would never be drawn.
    """
    total = float(sum(weights))
    shares = [w / total for w in weights]
    period = global_batch * math.ceil(MIN_PERIOD / global_batch)
    times, owners, ranks = [], [], []
    for s, share in enumerate(shares):
        count = math.ceil(share * period) + 1
        times.append((np.arange(count) + 0.5) / share)
        owners.append(np.full(count, s))
        ranks.append(np.arange(count))
    times_all, owners_all = np.concatenate(times), np.concatenate(owners)
    order = np.lexsort((owners_all, times_all))[:period]  # by time, ties by source order
    source, rank = owners_all[order], np.concatenate(ranks)[order]
    quota = tuple(int((source == s).sum()) for s in range(len(shares)))
    if 0 in quota:
        s = quota.index(0)
        raise ValueError(
            f"source number {s} has weight {weights[s]}, less than one window in {period}: "
            "raise its weight or drop it."
        )
    return Mixture(tuple(int(n) for n in windows), quota, source, rank, seed)


def mixture_plan(
    names: Sequence[str],
    stores: Mapping[str, Mapping[str, Any]],
    shares: Sequence[float],
    global_batch: int,
    total_steps: int,
) -> dict[str, dict[str, Any]]:
    """Per source: tokens, windows, share of each step, windows per step, epochs by the end."""
    plan = {}
    for name, share in zip(names, shares, strict=True):
        info = stores[name]
        draws = share * global_batch * total_steps
        plan[name] = {
            "tokens": int(info["tokens"]),
            "windows": int(info["windows"]),
            "weight": info.get("weight"),
            "share": round(share, 6),
            "windows_per_step": round(share * global_batch, 3),
            "epochs": round(draws / info["windows"], 4),
        }
    return plan
