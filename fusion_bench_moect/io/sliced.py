"""Read rows of the tensors of a safetensors checkpoint with positioned reads (no memory map).

Sharded training loads each process's rows of every parameter and nothing else. A memory map
would count every page it touches in the process's resident memory until the whole file is
unmapped; ``os.preadv`` into a tensor allocated for just those rows does not, so what a
process holds is what it keeps. ``bytes_read`` counts what was read (the tests check that no
process reads the whole model).

The model-side names (transformers 5's fused experts) map onto the hub's per-expert names
with ``io.mapped.hub_sources``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import ARCHITECTURES
from .mapped import block_prefixes, hub_sources
from .streaming import _DTYPE_CODES, INDEX_FILE, SINGLE_FILE

_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, the offset of its first byte, dtype and shape."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        count = self.dtype.itemsize
        for dim in self.shape[1:]:
            count *= dim
        return count


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, in file order."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    start = 8 + length
    end = max(
        (start + e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"),
        default=start,
    )
    if path.stat().st_size < end:
        raise ValueError(f"{path.name} is truncated ({path.stat().st_size} of {end} bytes)")
    entries = {
        name: Entry(path, start + e["data_offsets"][0], _DTYPES[e["dtype"]], tuple(e["shape"]))
        for name, e in header.items()
        if name != "__metadata__"
    }
    return dict(sorted(entries.items(), key=lambda item: item[1].offset))


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face directory (its shards, or the single file)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    return [directory / SINGLE_FILE]


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a local Hugging Face directory with safetensors weights."""
    directory = Path(directory)
    return directory.is_dir() and all(p.is_file() for p in checkpoint_files(directory))


class CheckpointReader:
    """Rows of the tensors of the checkpoint in ``directory``, read on demand.

    Attributes:
        entries: Every tensor by hub name, in file order.
        bytes_read: Bytes read so far.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.entries: dict[str, Entry] = {}
        for path in checkpoint_files(self.directory):
            self.entries.update(read_header(path))
        self.bytes_read = 0

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dimension 0) of tensor ``name`` (all of a 0-d tensor)."""
        out = read_rows(self.entries[name], start, stop)
        self.bytes_read += out.numel() * out.element_size()
        return out


def read_rows(entry: Entry, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (dimension 0) of the tensor at ``entry`` (all of a 0-d tensor)."""
    if not entry.shape:
        start, stop, shape = 0, 1, ()
    else:
        stop = entry.shape[0] if stop is None else stop
        shape = (stop - start, *entry.shape[1:])
    out = torch.empty(shape, dtype=entry.dtype)
    if not out.numel():
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
    offset = entry.offset + start * entry.row_bytes
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{entry.path}: truncated (wanted {len(view)} bytes at {offset}).")
            done += n
    finally:
        os.close(fd)
    return out


def rows_across(parts: Sequence[Entry], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the concatenation of ``parts`` along dimension 0 (the per-process
    shards of one tensor), reading only those rows."""
    pieces, offset = [], 0
    for part in parts:
        low, high = max(start, offset), min(stop, offset + part.shape[0])
        if low < high:
            pieces.append(read_rows(part, low - offset, high - offset))
        offset += part.shape[0]
    return torch.cat(pieces) if pieces else read_rows(parts[0], 0, 0)


class ModelSource:
    """The checkpoint behind a model: its reader and how model names map onto its tensors."""

    def __init__(self, model: nn.Module, directory: str | Path) -> None:
        self.reader = CheckpointReader(directory)
        self.arch = ARCHITECTURES[model.config.model_type]()
        self.prefixes = block_prefixes(model, self.arch)

    def sources(self, name: str) -> tuple[list[str], int]:
        """The hub tensors of model tensor ``name`` and how many experts they stack."""
        return hub_sources(name, self.reader.entries, self.prefixes, self.arch)

    def dtype(self, name: str) -> torch.dtype:
        """The checkpoint's dtype of model tensor ``name``."""
        return self.reader.entries[self.sources(name)[0][0]].dtype

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of model tensor ``name`` (for fused experts: experts)."""
        parts, experts = self.sources(name)
        if not experts:
            return self.reader.read(parts[0], start, stop)
        per = len(parts) // experts
        stop = experts if stop is None else stop
        stacked = [
            torch.cat([self.reader.read(p) for p in parts[j * per : (j + 1) * per]])
            for j in range(start, stop)
        ]
        if stacked:
            return torch.stack(stacked)
        shapes = [self.reader.entries[p].shape for p in parts[:per]]
        rows = sum(s[0] for s in shapes)
        return torch.empty((0, rows, *shapes[0][1:]), dtype=self.dtype(name))
