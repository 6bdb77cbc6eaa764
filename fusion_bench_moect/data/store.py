"""The token store: each training source tokenised once into a memory-mapped file of ids.

A store is a directory ``<cache>/<name>-<key>/`` holding ``tokens.bin`` (every document's token
ids, EOS after each, as ``uint16`` where the vocabulary fits, else ``uint32``: Megatron's
indexed-dataset idea) and ``meta.json`` (counts, the largest id, a BLAKE2b digest of
``tokens.bin``; ``verified.json`` records the file's state when the digest last matched, so
a launch reads the whole file only after it changed). The key hashes the source's identity
(its spec and every file's path, size and mtime), the tokenizer's identity (its serialised
``tokenizer.json``) and the packing settings (EOS, ``max_tokens``), so a changed file or
tokenizer gets a new store and stale ids are never read. The window length is applied when
reading, so one store serves every ``seq_len``.

Stores are written in a temporary directory moved into place by one rename
(``io.checkpoint.atomic_directory``): a build killed at any point leaves no directory that
``open_store`` reads as complete. Tokenisation uses the Rust backend's batch encoding, which
spreads pieces of text over all cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.checkpoint import atomic_directory, write_text_atomically
from ..paths import cache_root
from .documents import TrainingDataError, iter_documents, source_files

log = logging.getLogger(__name__)

FORMAT = 1
TOKENS = "tokens.bin"
META = "meta.json"
VERIFIED = "verified.json"
PIECE_CHARS = 1 << 16
"""Text is cut (after a line break) into pieces of about this many characters: measured the
fastest size for the batch encoder here (64 KiB: 1.9 MB/s; 4 KiB: 1.2; 1 MiB: 1.1)."""
BATCH_CHARS = 8 << 20
"""Characters handed to one ``encode_batch_fast`` call (bounds the memory of a build)."""


class StoreCorruptError(TrainingDataError):
    """A token store on disk is incomplete, truncated or altered."""


STORES_ENV = "FUSION_BENCH_MOECT_TOKEN_STORES"
"""Environment variable naming the default store folder (the tests point it at a temporary)."""


def default_cache_dir() -> Path:
    """``$FUSION_BENCH_MOECT_TOKEN_STORES``, else ``<cache_root>/token_stores``."""
    value = os.environ.get(STORES_ENV)
    return Path(value).expanduser() if value else cache_root() / "token_stores"


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full serialisation (vocabulary, merges, normalisers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TrainingDataError(
            f"The token store needs a fast (Rust) tokenizer; {type(tokenizer).__name__} has "
            "none: load the tokenizer with use_fast=True."
        )
    text = backend.to_str() + f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def store_key(spec: Any, tokenizer_id: str, max_tokens: int | None) -> str:
    """The hex key of a source's store: source identity, tokenizer identity, packing."""
    if isinstance(spec, Mapping) and set(spec) == {"path"}:
        spec = spec["path"]  # the same source as the bare path: the same store
    identity = {
        "format": FORMAT,
        "spec": spec,
        "files": [
            [str(p), s.st_size, s.st_mtime_ns] for p in source_files(spec) for s in [p.stat()]
        ],
        "tokenizer": tokenizer_id,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def store_path(cache_dir: str | os.PathLike | None, name: str, key: str) -> Path:
    """Where the store of source ``name`` with ``key`` lives."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:20]}"


@dataclass
class TokenStore:
    """An opened store: ``tokens`` is a read-only ``np.memmap`` of every id of the source."""

    path: Path
    tokens: np.ndarray
    meta: dict[str, Any]

    def num_windows(self, seq_len: int) -> int:
        """Whole windows of ``seq_len`` tokens (the tail is dropped)."""
        return len(self.tokens) // seq_len


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_state(path: Path) -> dict[str, int]:
    """What any write to a file changes: its size, inode and times (ctime cannot be set back)."""
    st = path.stat()
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}  # fmt: skip


def _stamp_verified(path: Path) -> None:
    """Record that ``tokens.bin`` matched its digest in this state, so later launches skip the
    full read (about 1 s per 400 MB here: 25 s a launch at 10 GB) until the file changes."""
    try:
        write_text_atomically(path / VERIFIED, json.dumps(_file_state(path / TOKENS)))
    except OSError as err:  # a read-only cache: verify on every launch instead
        log.debug("Cannot record the check of %s (%s)", path, err)


def _verified(path: Path) -> bool:
    try:
        return json.loads((path / VERIFIED).read_text()) == _file_state(path / TOKENS)
    except (OSError, ValueError):
        return False


def open_store(path: str | os.PathLike, key: str | None = None, verify: bool = False) -> TokenStore:
    """Open a complete store memory-mapped.

    Args:
        path: The store directory.
        key: The expected key (None: any).
        verify: Also compare ``tokens.bin``'s digest (reads it once), unless it was checked
            before and the file has not changed since (``verified.json``).

    Raises:
        StoreCorruptError: Missing, truncated, altered or of another key; one line.
    """
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected = int(meta["tokens"]) * itemsize
        if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
            raise ValueError("written for another source, tokenizer or format")
        size = (path / TOKENS).stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreCorruptError(f"Token store {path} is incomplete or corrupt ({err}).") from None
    if size != expected:
        raise StoreCorruptError(
            f"Token store {path} is truncated: {TOKENS} has {size} bytes, meta.json says "
            f"{expected}."
        )
    if verify and not _verified(path):
        if _digest(path / TOKENS) != meta["blake2b"]:
            raise StoreCorruptError(f"Token store {path}: {TOKENS} does not match its digest.")
        _stamp_verified(path)
    tokens = np.memmap(path / TOKENS, dtype=meta["dtype"], mode="r") if size else np.zeros(0)
    return TokenStore(path, tokens, meta)


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of about ``PIECE_CHARS``, each cut after a line break if any."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = text.rfind("\n", start, start + PIECE_CHARS) + 1
        end = end if end > start else start + PIECE_CHARS
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def _batches(
    documents: Iterable[tuple[str, Iterable[str]]], name: str, stats: dict[str, int]
) -> Iterator[list[str | None]]:
    """Pieces of text in batches of about ``BATCH_CHARS`` (a long document spans batches);
    ``None`` marks the end of a document."""
    pieces: list[str | None] = []
    size = 0
    for doc_name, chunks in documents:
        stats["documents"] += 1
        found = False
        for chunk in chunks:
            if not chunk.strip():
                continue
            found = True
            stats["characters"] += len(chunk)
            pieces.extend(_pieces(chunk))
            size += len(chunk)
            if size >= BATCH_CHARS:
                yield pieces
                pieces, size = [], 0
        if not found:
            raise TrainingDataError(
                f"Training source {name!r}: {doc_name} is empty; remove it or add text."
            )
        pieces.append(None)
    if pieces:
        yield pieces


def encode_documents(
    tokenizer: Any, documents: Iterable[tuple[str, Iterable[str]]], name: str, stats: dict
) -> Iterator[np.ndarray]:
    """Token ids of the documents (EOS after each) in blocks, by the batch encoder."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    for pieces in _batches(documents, name, stats):
        texts = [p for p in pieces if p is not None]
        encodings = iter(backend.encode_batch_fast(texts, add_special_tokens=False))
        parts = [
            np.asarray(next(encodings).ids if p is not None else [eos], dtype=np.int64)
            for p in pieces
            if p is not None or eos is not None
        ]
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _write_tokens(
    tokenizer: Any, spec: Any, name: str, handle: Any, dtype: np.dtype, max_tokens: int | None
) -> dict[str, Any]:
    stats = {"characters": 0, "documents": 0}
    documents = iter_documents(spec)
    written, encoded, largest, digest = 0, 0, -1, hashlib.blake2b(digest_size=16)
    for ids in encode_documents(tokenizer, documents, name, stats):
        encoded += len(ids)
        if max_tokens is not None:
            ids = ids[: max_tokens - written]
        if len(ids):
            largest = max(largest, int(ids.max()))
            block = ids.astype(dtype).tobytes()
            handle.write(block)
            digest.update(block)
            written += len(ids)
        if max_tokens is not None and written >= max_tokens:
            break
    kept = dict(stats)
    dropped = None
    if max_tokens is not None and written >= max_tokens:
        rest = {"tokens": encoded - written, "characters": 0, "documents": 0}
        for _, chunks in documents:  # counted, not tokenised: what the cap dropped
            rest["documents"] += 1
            rest["characters"] += sum(len(c) for c in chunks)
        dropped = rest
    return {"tokens": written, "max_id": largest, "blake2b": digest.hexdigest(), "read": kept,
            "dropped_by_cap": dropped}  # fmt: skip


def build_store(
    tokenizer: Any, spec: Any, path: Path, key: str, name: str, max_tokens: int | None
) -> dict[str, Any]:
    """Tokenise a source into ``path``, atomically; return its meta (also in meta.json)."""
    started = time.perf_counter()
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    with atomic_directory(path, overwrite=True) as tmp:
        with open(tmp / TOKENS, "wb") as handle:
            meta = _write_tokens(tokenizer, spec, name, handle, dtype, max_tokens)
            handle.flush()
            os.fsync(handle.fileno())
        meta.update(format=FORMAT, key=key, name=name, dtype=dtype.name, max_tokens=max_tokens,
                    seconds=round(time.perf_counter() - started, 3))  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    return meta


def ensure_store(
    tokenizer: Any,
    spec: Any,
    name: str,
    cache_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    build: bool = True,
) -> TokenStore:
    """The store of one source, opened; built (or rebuilt when corrupt) if needed.

    Args:
        tokenizer: A fast transformers tokenizer.
        spec: The source (as ``iter_documents`` takes it).
        name: Its name (in the directory's name and in messages).
        cache_dir: Where stores live (None: ``default_cache_dir()``).
        max_tokens: Keep the first this many tokens (None: all).
        build: Build a missing or corrupt store and check an existing one's digest; False
            only opens it (the processes that wait for a builder).

    Raises:
        TrainingDataError, FileNotFoundError: For a bad source (before anything is written).
        OSError: When the build cannot be written (e.g. a full disk); an older store of the
            same key stays as it was.
    """
    key = store_key(spec, tokenizer_identity(tokenizer), max_tokens)
    path = store_path(cache_dir, name, key)
    if not build:
        return open_store(path, key)
    if (path / META).exists():
        try:
            return open_store(path, key, verify=True)
        except StoreCorruptError as err:
            log.warning("%s Rebuilding it.", err)
    log.info("Tokenising training source %r into %s", name, path)
    try:
        meta = build_store(tokenizer, spec, path, key, name, max_tokens)
    except OSError as err:
        if isinstance(err, FileNotFoundError) and err.filename is None:
            raise  # a missing source, named by its reader
        raise OSError(
            err.errno, f"Cannot write the token store of source {name!r} in {path.parent} "
            f"({err.strerror or err}); free space there or set data_cache_dir elsewhere"
        ) from err  # fmt: skip
    log.info("Token store %s: %d tokens, %d documents in %.1f s", path.name, meta["tokens"],
             meta["read"]["documents"], meta["seconds"])  # fmt: skip
    _stamp_verified(path)  # its digest was taken from the bytes written
    return open_store(path, key)


def describe_cap(name: str, meta: Mapping[str, Any]) -> str | None:
    """A line saying what ``max_tokens`` dropped of a source, or None when nothing was."""
    dropped = meta.get("dropped_by_cap")
    if not dropped or not (dropped["tokens"] or dropped["documents"]):
        return None
    return (
        f"Training source {name!r} is capped at max_tokens_per_source={meta['max_tokens']}: "
        f"kept {meta['tokens']} tokens, dropped {dropped['tokens']} more tokens of the "
        f"{meta['read']['documents']} documents read (the last in part perhaps) and {dropped['documents']} documents "
        f"({dropped['characters']} characters) not read; max_tokens_per_source: null keeps all."
    )
