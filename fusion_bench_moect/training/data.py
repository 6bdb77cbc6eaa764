"""Training data: the documents of each source tokenised and packed into fixed windows.

The documents come from ``data.documents`` (files, folders, globs, ``.jsonl``, the Debian
Reference, literal text); each chunk is tokenised as it is read, so only the token ids (4 bytes
per token) stay in memory, never the text. Documents are joined with EOS and every source is
cut into ``seq_len`` windows on its own.

How the windows are handed out to processes: ``sampler``.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..data.documents import TrainingDataError, iter_documents

log = logging.getLogger(__name__)

__all__ = [
    "TrainingDataError",
    "iter_documents",
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
