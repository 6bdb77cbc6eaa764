"""Write Hugging Face checkpoints tensor by tensor, without holding the model in memory.

The safetensors format is an 8-byte header length, a JSON header giving every tensor's
dtype, shape and byte range, then the raw bytes. When the names, shapes and dtypes of all
tensors are known before any is computed (they are: the expert plan fixes them), every
shard's header and every tensor's place are known first, and each tensor is written there as
soon as it exists, in whatever order it comes (``io.filewriter``: a background thread, direct
I/O where available). Peak memory is then the tensors in flight plus a few staging buffers,
not the shard and not the model.

The result is the standard hub layout: ``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``, then
``config.json`` (with the keys transformers 4 needs), the tokenizer (under a class name both
majors load) and, when there is one, ``generation_config.json`` — all written atomically (``io.checkpoint.atomic_directory``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..model_card import CARD_FILE
from ..progress import progress
from .checkpoint import atomic_directory, make_portable, write_extra_files
from .filewriter import PositionalWriter

log = logging.getLogger(__name__)

#: Largest shard, as ``save_checkpoint`` (``max_shard_size="2GB"``).
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Files a tokenizer directory may hold (copied as they are when no tokenizer object is given).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
)

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

#: (name, shape, dtype) of one tensor to write.
TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def spec_nbytes(spec: TensorSpec) -> int:
    """Bytes of one tensor on disk."""
    _, shape, dtype = spec
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def shard_layout(
    specs: Sequence[TensorSpec], max_shard_bytes: int, units: Sequence[int] | None = None
) -> list[list[TensorSpec]]:
    """Split ``specs``, in order, into shards of at most ``max_shard_bytes``.

    Args:
        specs: The tensors in file order.
        max_shard_bytes: Largest shard; a single larger unit gets a shard of its own.
        units: Lengths of consecutive runs of ``specs`` that must share a shard (their sum is
            ``len(specs)``); default every tensor alone.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = start = 0
    for length in units if units is not None else [1] * len(specs):
        unit = specs[start : start + length]
        start += length
        nbytes = sum(spec_nbytes(spec) for spec in unit)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += nbytes
    if start != len(specs):
        raise ValueError(f"Internal error: units cover {start} of {len(specs)} tensors.")
    return shards if shards[-1] else []


def _header(specs: Sequence[TensorSpec]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"Tensor '{name}': dtype {dtype} cannot be stored in safetensors.")
        end = offset + spec_nbytes((name, shape, dtype))
        entries[name] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class ShardedSafetensorsWriter:
    """Write planned tensors, in any order, straight into safetensors shards.

    Args:
        directory: An existing (temporary) directory.
        specs: (name, shape, dtype) of every tensor, in file order.
        max_shard_bytes: Largest shard.
        units: Runs of ``specs`` kept in one shard (``shard_layout``).

    Every tensor's file and offset follow from the plan, so each is written where it belongs
    as soon as it arrives (``io.filewriter``, in the background); a shard is closed when its
    last tensor is in. Use as a context manager; ``close`` checks that every planned tensor
    was written and writes the index when there is more than one shard.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        units: Sequence[int] | None = None,
    ) -> None:
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"Tensor '{dup}' is planned twice.")
        self.directory = Path(directory)
        self.shards = shard_layout(specs, max_shard_bytes, units)
        count = len(self.shards)
        self.files = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._headers = [_header(shard) for shard in self.shards]
        #: name -> (shard, offset in its file, spec)
        self._place: dict[str, tuple[int, int, TensorSpec]] = {}
        self._sizes = []
        for i, shard in enumerate(self.shards):
            offset = len(self._headers[i])
            for spec in shard:
                self._place[spec[0]] = (i, offset, spec)
                offset += spec_nbytes(spec)
            self._sizes.append(offset)
        self._left = [len(shard) for shard in self.shards]
        self._written: set[str] = set()
        self._sink: PositionalWriter | None = None
        self.bytes_written = 0

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._sink is not None:
            self._sink.abort()
            self._sink = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a planned tensor; its shape and dtype must be the planned ones."""
        if name not in self._place or name in self._written:
            state = "written twice" if name in self._written else "not planned"
            raise RuntimeError(f"Internal error: tensor '{name}' was {state}.")
        index, offset, (_, want_shape, want_dtype) = self._place[name]
        if (tuple(tensor.shape), tensor.dtype) != (tuple(want_shape), want_dtype):
            raise RuntimeError(
                f"Internal error: the writer expected {name} {list(want_shape)} "
                f"{want_dtype}, got {name} {list(tensor.shape)} {tensor.dtype}."
            )
        if self._sink is None:
            self._sink = PositionalWriter()
        if self._left[index] == len(self.shards[index]):  # the shard's first tensor
            self._sink.open(index, self.directory / self.files[index], self._sizes[index])
            self._sink.write(index, 0, memoryview(self._headers[index]))
        self._sink.write(index, offset, _tensor_bytes(tensor))
        self._written.add(name)
        self._left[index] -= 1
        if not self._left[index]:
            self._sink.finish(index)
        self.bytes_written += tensor.numel() * tensor.element_size()

    def close(self) -> list[str]:
        """Finish the writes and write the index; returns the shard file names."""
        planned = (spec[0] for shard in self.shards for spec in shard)
        left = next((name for name in planned if name not in self._written), None)
        if self._sink is not None:
            sink, self._sink = self._sink, None
            if left is None:
                sink.close()
            else:
                sink.abort()
        if left is not None:
            raise RuntimeError(f"Internal error: planned tensor '{left}' was never written.")
        if len(self.files) > 1:
            weight_map = {
                name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard
            }
            total = sum(spec_nbytes(s) for shard in self.shards for s in shard)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


def write_hub_checkpoint(
    directory: str | os.PathLike,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Any | Callable[[], Any],
    *,
    tokenizer: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    generation_config: Any = None,
    generation_config_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    units: Sequence[int] | None = None,
    card: Callable[[Any], str] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint from a stream of tensors, all or nothing.

    Args:
        directory: Target directory (refused if non-empty unless ``overwrite``).
        specs: (name, shape, dtype) of every tensor ``tensors`` yields, in file order.
        tensors: (hub name, tensor) pairs in any order, each written as soon as it arrives.
        config: The transformers config, or a function returning it, called after the last
            tensor (so it can record what was computed on the way).
        tokenizer: A tokenizer object to save (``save_pretrained``).
        tokenizer_dir: Or a directory whose tokenizer files are copied as they are.
        generation_config: A ``GenerationConfig`` to save.
        generation_config_from: Or a directory whose ``generation_config.json`` is copied.
        overwrite: Replace a non-empty ``directory``.
        max_shard_bytes: Largest shard.
        units: Runs of ``specs`` kept in one shard (``shard_layout``).
        card: Returns the model card (``README.md``) given the final config.
        extra_files: More files to write beside the model, name -> text or bytes.

    Returns:
        The checkpoint directory.
    """
    with atomic_directory(directory, overwrite) as tmp:
        with ShardedSafetensorsWriter(tmp, specs, max_shard_bytes, units) as writer:
            for name, tensor in progress(tensors, total=len(specs), desc="Writing", leave=False):
                writer.write(name, tensor)
        final_config = config() if callable(config) else config
        final_config.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card(final_config))
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        elif generation_config_from is not None:
            source = Path(generation_config_from) / "generation_config.json"
            if source.is_file():
                shutil.copyfile(source, tmp / source.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        make_portable(tmp)
        write_extra_files(tmp, extra_files)
    target = Path(directory).expanduser().absolute()
    log.info(
        "Saved MoE checkpoint to %s (%d tensors, %.2f GB in %d shard(s))",
        target,
        len(specs),
        writer.bytes_written / 1e9,
        len(writer.files),
    )
    return target


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of a Hugging Face directory; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, Path(destination) / name)
            copied.append(name)
    return copied
