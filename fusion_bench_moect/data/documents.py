"""Documents of a text source, read lazily: files, folders, globs, ``.jsonl``, parquet, arrow,
``datasets`` folders and cached datasets (``tables``), the Debian Reference, literal text.

A source is a file, a folder (its ``*.txt`` files), a glob, a ``.jsonl`` file (one document
per line, the text under ``field``), the Debian Reference, or literal text (see
``iter_documents``). Files are read and decoded in chunks of ``CHUNK_BYTES``, so a document is
never held whole in memory, only the chunk being tokenised.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import TrainingDataError
from .tables import TABLE_KINDS, iter_table, table_files
from .text import (
    DEBIAN_REFERENCE_DIR,
    HTML_SUFFIXES,
    expand_paths,
    html_paragraphs,
    load_debian_reference,
    source_kind,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
"""Bytes read (and decoded, and tokenised) at a time from a file."""


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def iter_file_chunks(path: str | os.PathLike) -> Iterator[str]:
    """Decode a UTF-8 file (``.gz`` too) in chunks that end at a line break.

    Raises:
        TrainingDataError: If the file is not valid UTF-8 (names the byte offset).
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, carry = 0, ""
    with _open_binary(path) as handle:
        while True:
            raw = handle.read(CHUNK_BYTES)
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise TrainingDataError(
                    f"Training file {path} is not UTF-8 text (bad byte near offset "
                    f"{offset + err.start}); convert it (iconv -t UTF-8) or drop it from "
                    "train_sources."
                ) from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut]
                carry = text[cut:]
            else:
                carry = text


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[str, Iterator[str]]]:
    carry = ""
    line_no = 0
    for chunk in iter_file_chunks(path):
        lines = (carry + chunk).split("\n")
        carry = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                yield f"{path}:{line_no}", iter([_jsonl_text(path, line_no, line, field)])
    if carry.strip():
        yield f"{path}:{line_no + 1}", iter([_jsonl_text(path, line_no + 1, carry, field)])


def _jsonl_text(path: Path, line_no: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TrainingDataError(f"{path}, line {line_no}: not valid JSON ({err.msg}).") from None
    if not isinstance(record, Mapping) or not isinstance(record.get(field), str):
        raise TrainingDataError(
            f"{path}, line {line_no}: no string field {field!r}; set `field:` in the source "
            f"({{jsonl: {path}, field: <name>}})."
        )
    return record[field]


def _iter_files(pattern: Any) -> Iterator[tuple[str, Iterator[str]]]:
    for path in expand_paths(str(pattern)):
        if path.suffix in (".parquet", ".arrow"):
            yield from iter_table({path.suffix[1:]: str(path)}, path.suffix[1:])
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(path, "text")
        elif path.suffix.lower() in HTML_SUFFIXES:
            text = "".join(iter_file_chunks(path))
            yield str(path), iter(["\n\n".join(html_paragraphs(text))])
        else:
            yield str(path), iter_file_chunks(path)


KINDS = ("debian_reference", "path", "paths", "jsonl", "text", *TABLE_KINDS)
"""The keys that name a training source's kind in its mapping."""


def source_files(spec: Any) -> list[Path]:
    """The files a source reads (empty for literal text), for the token store's key.

    Raises:
        FileNotFoundError, TrainingDataError: As ``iter_documents`` would.
    """
    if isinstance(spec, (str, os.PathLike)):
        return expand_paths(str(spec))
    if not isinstance(spec, Mapping):
        raise TrainingDataError(
            f"A training source must be a path/glob or a mapping, got {spec!r}."
        )
    kind = source_kind(spec, KINDS, "training", TrainingDataError)
    if kind in TABLE_KINDS:
        return table_files(spec, kind)
    if kind == "debian_reference":
        root = Path(spec.get("root") or DEBIAN_REFERENCE_DIR)
        langs = {str(spec["debian_reference"]), "en"}
        return sorted(p for p in root.glob("*.html") if p.name.split(".")[-2] in langs)
    if kind == "text":
        return []
    patterns = [spec[kind]] if kind in ("path", "jsonl") else list(spec["paths"])
    return [path for pattern in patterns for path in expand_paths(str(pattern))]


def iter_documents(spec: Any) -> Iterator[tuple[str, Iterator[str]]]:
    """The documents of one source, each as (name, chunks of text), read lazily.

    Args:
        spec: A path / folder / glob string (``*.jsonl``, ``*.parquet`` and ``*.arrow`` files
            read their ``text`` field), or a mapping with exactly one of ``path``, ``paths``,
            ``jsonl``, ``parquet``, ``arrow`` (optional ``field``, default ``text``),
            ``dataset`` (a ``save_to_disk`` folder or a name in the local Hugging Face cache;
            ``split``, default ``train``, ``config``, ``field``), ``debian_reference``
            (optional ``split``, default ``train``) or ``text``.

    Raises:
        FileNotFoundError: For paths that match nothing, or a missing Debian package.
        TrainingDataError: For a malformed mapping.
    """
    if isinstance(spec, (str, os.PathLike)):
        yield from _iter_files(spec)
        return
    if not isinstance(spec, Mapping):
        raise TrainingDataError(
            f"A training source must be a path/glob or a mapping, got {spec!r}."
        )
    kind = source_kind(spec, KINDS, "training", TrainingDataError)
    if kind in TABLE_KINDS:
        yield from iter_table(spec, kind)
    elif kind == "debian_reference":
        for doc in load_debian_reference(
            str(spec["debian_reference"]),
            split=str(spec.get("split", "train")),
            root=spec.get("root"),
            drop_untranslated=bool(spec.get("drop_untranslated", True)),
        ):
            yield doc.name, iter([doc.text])
    elif kind == "text":
        yield "<text>", iter([str(spec["text"])])
    elif kind == "jsonl":
        for path in expand_paths(str(spec["jsonl"])):
            yield from _iter_jsonl(path, str(spec.get("field", "text")))
    else:
        for pattern in [spec["path"]] if kind == "path" else list(spec["paths"]):
            yield from _iter_files(pattern)
