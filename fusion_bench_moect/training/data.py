"""Training data: every source's token store (``data.store``), opened memory-mapped and cut
into ``seq_len`` windows, with the plan of the mixture (``data.mixture``).

``shared_training_data`` builds the stores on each node's local rank 0 while the other
processes wait, then every process maps the same files (one copy in the page cache per
machine). ``pack_documents`` / ``token_windows`` tokenise in memory (evaluation, the study and
the benchmarks' baseline).

How the windows are handed out to processes: ``sampler``.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.documents import TrainingDataError, iter_documents
from ..data.mixture import Mixture, make_mixture, mixture_plan
from ..data.store import TokenStore, describe_cap, ensure_store

log = logging.getLogger(__name__)

__all__ = [
    "TrainingData",
    "TrainingDataError",
    "iter_documents",
    "log_data_plan",
    "open_training_data",
    "shared_training_data",
    "load_windows",
    "pack_documents",
    "pack_source",
    "token_windows",
]


def pack_documents(
    tokenizer: Any,
    documents: Iterable[tuple[str, Iterable[str]]],
    seq_len: int,
    max_tokens: int | None = None,
    name: str = "source",
    allow_empty: bool = False,
) -> torch.Tensor:
    """Tokenise documents chunk by chunk (EOS after each) and cut ``(N, seq_len)`` windows.

    Args:
        tokenizer: A transformers tokenizer.
        documents: (name, chunks of text) pairs, as ``iter_documents`` yields them.
        seq_len: Tokens per window.
        max_tokens: Stop reading after this many tokens (``None`` = all).
        name: The source's name, for messages.
        allow_empty: Skip empty documents instead of refusing them.

    Returns:
        An ``int32`` tensor of shape ``(N, seq_len)``.

    Raises:
        TrainingDataError: For an empty document, or fewer tokens than one window.
    """
    eos = tokenizer.eos_token_id
    ids = array("i")
    for doc_name, chunks in documents:
        before = len(ids)
        for chunk in chunks:
            if chunk.strip():
                ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if len(ids) == before:
            if allow_empty:
                continue
            raise TrainingDataError(
                f"Training source {name!r}: {doc_name} is empty; remove it or add text."
            )
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    count = len(ids) // seq_len
    if count == 0:
        raise TrainingDataError(
            f"Training source {name!r} has {len(ids)} tokens, fewer than one window of "
            f"seq_len={seq_len}; add text or lower seq_len."
        )
    return torch.frombuffer(ids, dtype=torch.int32)[: count * seq_len].clone().view(count, seq_len)


def pack_source(
    tokenizer: Any, spec: Any, seq_len: int, max_tokens: int | None = None, name: str = "source"
) -> torch.Tensor:
    """``pack_documents`` over the documents of one source (see ``iter_documents``)."""
    return pack_documents(tokenizer, iter_documents(spec), seq_len, max_tokens, name)


def token_windows(
    tokenizer: Any, texts: Sequence[str], seq_len: int, max_tokens: int | None
) -> torch.Tensor:
    """Pack in-memory texts (EOS between them) into ``(N, seq_len)`` ``long`` windows."""
    documents = ((f"text {i}", [t]) for i, t in enumerate(texts))
    return pack_documents(
        tokenizer, documents, seq_len, max_tokens, name="text", allow_empty=True
    ).long()


def load_windows(
    tokenizer: Any, sources: Mapping[str, Any], seq_len: int, max_tokens: int | None
) -> tuple[torch.Tensor, dict[str, int]]:
    """Pack every named source; return all windows and the window count per source."""
    if not sources:
        raise TrainingDataError(
            "moe_ct_training needs train_sources (files, folders, globs, .jsonl or "
            "{debian_reference: LANG})."
        )
    packed = {
        name: pack_source(tokenizer, spec, seq_len, max_tokens, name)
        for name, spec in sources.items()
    }
    return torch.cat(list(packed.values())), {n: len(w) for n, w in packed.items()}


def split_weights(sources: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The sources without their ``weight`` keys, and the weights (None when none has one).

    Raises:
        TrainingDataError: When only some sources have a weight, or one is not positive.
    """
    specs, weights = {}, {}
    for name, spec in sources.items():
        if isinstance(spec, Mapping) and "weight" in spec:
            weight = spec["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise TrainingDataError(
                    f"Training source {name!r}: weight must be a positive number, got {weight!r}."
                )
            weights[name] = float(weight)
            spec = {k: v for k, v in spec.items() if k != "weight"}
        specs[name] = spec
    if weights and len(weights) != len(specs):
        missing = sorted(set(specs) - set(weights))
        raise TrainingDataError(
            f"Training sources {missing} have no weight while others do; give every source a "
            "weight (shares of each step) or none (sources mixed by size)."
        )
    return specs, weights or None


@dataclass
class TrainingData(Dataset):
    """The windows of every source, read from their memory-mapped stores.

    Window ``i`` of the whole is window ``i - offsets[s]`` of source ``s``; a weighted mixture
    picks windows by slot (``mixture``), an unweighted run shuffles all of them together.

    Attributes:
        stores: The opened store of each source, in source order.
        seq_len: Tokens per window.
        weights: Each source's weight (None: mixed by size).
        offsets: First global window index of each source.
    """

    stores: dict[str, TokenStore]
    seq_len: int
    weights: dict[str, float] | None = None
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        counts = [store.num_windows(self.seq_len) for store in self.stores.values()]
        for name, count in zip(self.stores, counts, strict=True):
            if count == 0:
                raise TrainingDataError(
                    f"Training source {name!r} has {len(self.stores[name].tokens)} tokens, "
                    f"fewer than one window of seq_len={self.seq_len}; add text or lower seq_len."
                )
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._tokens = [store.tokens for store in self.stores.values()]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (index - int(self.offsets[s])) * self.seq_len
        tokens = self._tokens[s][start : start + self.seq_len]
        return torch.from_numpy(tokens.astype(np.int64))

    @property
    def per_source(self) -> dict[str, int]:
        """Windows per source."""
        return {n: int(c) for n, c in zip(self.stores, np.diff(self.offsets), strict=True)}

    @property
    def largest_id(self) -> int:
        """The largest token id in any store (recorded when it was built)."""
        return max(int(store.meta["max_id"]) for store in self.stores.values())

    def mixture(self, global_batch: int, seed: int) -> Mixture | None:
        """The weighted mixture's layout (None for an unweighted run)."""
        if self.weights is None:
            return None
        weights = [self.weights[n] for n in self.stores]
        return make_mixture(weights, list(self.per_source.values()), global_batch, seed)

    def plan(self, mixture: Mixture | None, global_batch: int, total: int) -> dict[str, Any]:
        """Tokens, windows, weight, share of each step, epochs by ``total`` steps, per source."""
        per_source = self.per_source
        if mixture is None:
            shares = [n / len(self) for n in per_source.values()]
        else:
            shares = [q / mixture.period for q in mixture.quota]
        info = {
            n: {"tokens": int(s.meta["tokens"]), "windows": per_source[n],
                "weight": (self.weights or {}).get(n)}
            for n, s in self.stores.items()
        }  # fmt: skip
        return mixture_plan(list(self.stores), info, shares, global_batch, total)


def open_training_data(
    tokenizer: Any,
    sources: Mapping[str, Any],
    seq_len: int,
    cache_dir: str | None = None,
    max_tokens: int | None = None,
    build: bool = True,
) -> TrainingData:
    """Open (building if ``build`` and needed) the store of every source.

    Raises:
        TrainingDataError: For a bad source or weight, or a missing store when not ``build``.
    """
    if not sources:
        raise TrainingDataError(
            "moe_ct_training needs train_sources (files, folders, globs, .jsonl, parquet, "
            "arrow, {dataset: ...} or {debian_reference: LANG})."
        )
    specs, weights = split_weights(sources)
    stores = {
        name: ensure_store(tokenizer, spec, name, cache_dir, max_tokens, build=build)
        for name, spec in specs.items()
    }
    for name, store in stores.items():
        line = describe_cap(name, store.meta)
        if line and build:
            log.warning(line)
    return TrainingData(stores, seq_len, weights)


def shared_training_data(fabric: Any, tokenizer: Any, sources: Mapping[str, Any], seq_len: int,
                         cache_dir: str | None, max_tokens: int | None) -> TrainingData:  # fmt: skip
    """``open_training_data`` under Fabric: each node's local rank 0 builds the stores while
    the other processes wait, then every process maps them. An error on the builder is raised
    there; the others raise a line pointing to it (no process is left waiting)."""
    error = data = None
    if fabric.local_rank == 0:
        try:
            data = open_training_data(tokenizer, sources, seq_len, cache_dir, max_tokens)
        except Exception as err:  # re-raised below, after the others know
            error = err
    flag = torch.tensor(float(error is not None), device=fabric.device)
    failed = float(fabric.all_reduce(flag, reduce_op="sum"))  # also the barrier
    if error is not None:
        raise error
    if failed:
        raise TrainingDataError(
            "The token stores could not be built (the error of local rank 0 says why)."
        )
    if data is None:
        data = open_training_data(tokenizer, sources, seq_len, cache_dir, max_tokens, build=False)
    return data


def log_data_plan(plan: Mapping[str, Mapping[str, Any]], weighted: bool) -> None:
    """One log line per source: tokens, windows, share of each step, epochs by the end."""
    log.info("Data plan (%s):", "weights" if weighted else "sources mixed by size")
    for name, row in plan.items():
        log.info(
            "  %s: %d tokens, %d windows, weight %s, %.1f%% of each step (%.2f windows), "
            "%.3f epochs by the last step",
            name, row["tokens"], row["windows"], row["weight"], 100 * row["share"],
            row["windows_per_step"], row["epochs"],
        )  # fmt: skip
