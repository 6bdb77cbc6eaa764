"""Tabular training sources: parquet and arrow files, ``save_to_disk`` folders, datasets in the
local Hugging Face cache (offline only), one document per row of the text column ``field``.

The column is checked before any row is read: a missing column, a column that is not text or
an empty split is a one-line ``TrainingDataError`` naming the source and the fix. Rows whose
text is empty or null are skipped (records, not user files). ``pyarrow`` and ``datasets`` are
imported when such a source is read, so the text readers stay cheap to import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import TrainingDataError
from .text import expand_paths

TABLE_KINDS = ("parquet", "arrow", "dataset")


def _check_column(schema: Any, field: str, where: str) -> None:
    import pyarrow as pa  # only for tabular sources

    if field not in schema.names:
        raise TrainingDataError(
            f"{where} has no column {field!r} (columns: {', '.join(schema.names)}); set "
            "`field:` in the source to the text column."
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TrainingDataError(
            f"{where}: column {field!r} holds {kind}, not text; set `field:` to a text column."
        )


def _rows(batches: Iterator[Any], field: str, where: str) -> Iterator[tuple[str, Iterator[str]]]:
    row = 0
    for batch in batches:
        for text in batch.column(field).to_pylist():
            if text and text.strip():
                yield f"{where}:{row}", iter([text])
            row += 1
    if row == 0:
        raise TrainingDataError(f"{where} has no rows; give a split or file with text.")


def _iter_parquet(path: Path, field: str) -> Iterator[tuple[str, Iterator[str]]]:
    import pyarrow.parquet as pq  # only for tabular sources

    handle = pq.ParquetFile(path)
    _check_column(handle.schema_arrow, field, str(path))
    yield from _rows(handle.iter_batches(columns=[field], batch_size=1024), field, str(path))


def _open_arrow(path: Path) -> Any:
    import pyarrow as pa  # only for tabular sources

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))  # datasets' .arrow files
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            raise TrainingDataError(
                f"{path} is not an arrow file (IPC stream or file); give a .arrow file."
            ) from None


def _iter_arrow(path: Path, field: str) -> Iterator[tuple[str, Iterator[str]]]:
    reader = _open_arrow(path)
    _check_column(reader.schema, field, str(path))
    batches = (
        reader
        if hasattr(reader, "__iter__")
        else map(reader.get_batch, range(reader.num_record_batches))
    )
    yield from _rows(iter(batches), field, str(path))


@contextmanager
def _offline() -> Iterator[None]:
    """``HF_DATASETS_OFFLINE=1`` for the block: the local cache only, never a download."""
    import datasets.config  # only for cached datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def load_table_dataset(spec: Mapping[str, Any]) -> Any:
    """The ``datasets.Dataset`` of a ``{dataset: DIR_OR_NAME, split, config}`` source."""
    import datasets  # only for dataset sources

    target, split = str(spec["dataset"]), str(spec.get("split", "train"))
    folder = Path(os.path.expanduser(target))
    if folder.is_dir():
        loaded = datasets.load_from_disk(str(folder))
    else:
        try:
            with _offline():
                loaded = datasets.load_dataset(target, spec.get("config"))
        except Exception as err:  # datasets raises many kinds; the user needs one line
            raise TrainingDataError(
                f"Dataset {target!r} is neither a save_to_disk folder nor in the local Hugging "
                f"Face cache (offline; nothing is downloaded): {str(err).splitlines()[0]}"
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise TrainingDataError(
                f"Dataset {target!r} has no split {split!r} (splits: {', '.join(loaded)}); set "
                "`split:`."
            )
        loaded = loaded[split]
    return loaded


def iter_table(spec: Mapping[str, Any], kind: str) -> Iterator[tuple[str, Iterator[str]]]:
    """The rows of a tabular source as documents (see the module docstring)."""
    field = str(spec.get("field", "text"))
    if kind == "dataset":
        dataset = load_table_dataset(spec)
        where = f"dataset {spec['dataset']!r} (split {spec.get('split', 'train')!r})"
        _check_column(dataset.data.schema, field, where)
        yield from _rows(iter(dataset.data.to_batches(max_chunksize=1024)), field, where)
        return
    reader = _iter_parquet if kind == "parquet" else _iter_arrow
    for path in expand_paths(str(spec[kind])):
        yield from reader(path, field)


def table_files(spec: Mapping[str, Any], kind: str) -> list[Path]:
    """The files a tabular source reads (for the token store's key)."""
    if kind != "dataset":
        return expand_paths(str(spec[kind]))
    folder = Path(os.path.expanduser(str(spec["dataset"])))
    if folder.is_dir():
        return sorted(p for p in folder.rglob("*") if p.is_file())
    return sorted(Path(f["filename"]) for f in load_table_dataset(spec).cache_files)
