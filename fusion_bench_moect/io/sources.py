"""Read dense models tensor by tensor: safetensors directories lazily, loaded modules as they
are (PEFT adapters: ``io/lora.py``; FusionBench pool entries: ``io/pool.py``)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class SourceError(ValueError):
    """A pool model that cannot be read or does not match the base model."""


class TensorSource:
    """Read-only access to one dense model's config and tensors.

    Args:
        name: The model's name in the pool (used in every error message).
        config: The model's transformers config.
    """

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, checked to be finite.

        Raises:
            SourceError: If the tensor is missing, unreadable, or holds NaN/Inf.
        """
        try:
            tensor = self._read(key)
        except KeyError as err:
            raise SourceError(f"Model '{self.name}' has no tensor '{key}'.") from err
        except Exception as err:  # safetensors raises several types for damaged files
            raise SourceError(
                f"Model '{self.name}': tensor '{key}' cannot be read ({err}). The file may be "
                "truncated or corrupt; re-download or re-save this model."
            ) from err
        if tensor.is_floating_point() and not all_finite(tensor):
            raise SourceError(
                f"Model '{self.name}': tensor '{key}' contains NaN or Inf values; fix or "
                "replace this checkpoint before merging."
            )
        return tensor

    def close(self) -> None:
        """Release file handles and cached tensors."""


#: Per float dtype: the integer dtype of the same width, the mask that clears the sign bit,
#: and the bit pattern of +Inf (an all-ones exponent): NaN and Inf are exactly the values
#: whose magnitude bits are at least that.
_FLOAT_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
#: Elements per step of the bit test: the scratch stays in the CPU cache.
_FINITE_CHUNK = 1 << 18


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf.

    For the usual float dtypes the exponent bits are tested on an integer view, a chunk at a
    time into one small scratch buffer: one read of the tensor, no temporaries of its size,
    about 15x less than a float32 ``sum`` for bf16 (and exact: no overflow of huge finite
    values). Other dtypes use ``torch.isfinite``.
    """
    if tensor.numel() == 0:
        return True
    if tensor.dtype not in _FLOAT_BITS or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    int_dtype, magnitude, infinity = _FLOAT_BITS[tensor.dtype]
    bits = tensor.reshape(-1).view(int_dtype)
    scratch = torch.empty(min(bits.numel(), _FINITE_CHUNK), dtype=int_dtype)
    for start in range(0, bits.numel(), _FINITE_CHUNK):
        chunk = bits[start : start + _FINITE_CHUNK]
        part = scratch[: chunk.numel()]
        torch.bitwise_and(chunk, magnitude, out=part)
        if int(part.max()) >= infinity:
            return False
    return True


class SafetensorsSource(TensorSource):
    """A Hugging Face directory with ``model.safetensors`` or a sharded index; nothing is
    loaded until a tensor is asked for."""

    def __init__(self, name: str, config: Any, directory: Path) -> None:
        super().__init__(name, config)
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise SourceError(f"Model '{name}': {index} is not a valid index ({err}).") from err
            files = sorted(set(weight_map.values()))
        else:
            files = [SAFETENSORS_SINGLE]
            weight_map = None
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for file in files:
            path = self.directory / file
            try:
                handle = safe_open(str(path), framework="pt")
                for key in handle.keys():
                    self._file_of[key] = file
                    sl = handle.get_slice(key)
                    self._shape[key] = tuple(sl.get_shape())
                    self._dtype[key] = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
            except Exception as err:
                raise SourceError(
                    f"Model '{name}': cannot open {path} ({err}). The safetensors file is "
                    "missing, truncated or corrupt; re-download or re-save this model."
                ) from err
            self._handles[file] = handle
        if weight_map is not None:
            missing = set(weight_map) - set(self._file_of)
            if missing:
                raise SourceError(
                    f"Model '{name}': the index lists {len(missing)} tensors absent from the "
                    f"shards, e.g. '{sorted(missing)[0]}'; the checkpoint is incomplete."
                )

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype[key]

    def _read(self, key: str) -> torch.Tensor:
        return self._handles[self._file_of[key]].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ModuleSource(TensorSource):
    """A model already in memory (or loaded by the pool from a non-safetensors format)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module.config)
        self._state = dict(module.state_dict())

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def _read(self, key: str) -> torch.Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state.clear()


#: ``name`` or ``namespace/name``: what a pool entry that is not a local path may be (a model
#: in the Hugging Face cache); anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


_READ_FIX = "; make it readable (chmod -R a+rX) or use a copy you can read."


def check_local_path(owner: str, path: Any, needs: tuple[str, ...] = ("config.json",)) -> None:
    """Fail before anything loads when ``path`` (a pool entry, the pool's tokenizer, a CLI
    argument) names a local directory that is missing, unreadable or not a model directory.

    Args:
        owner: Who names the path, for the message (e.g. ``"Model 'ft'"``).
        path: The value; not a string or path, or a hub id absent locally: not checked.
        needs: File names of which the directory must hold at least one.

    Raises:
        SourceError: Naming the path and what is wrong with it.
    """
    if not isinstance(path, (str, os.PathLike)):
        return
    local = Path(path).expanduser()
    if not local.exists():
        if isinstance(path, str) and _HUB_ID.fullmatch(path):
            return  # left to the pool (the Hugging Face cache)
        raise SourceError(f"{owner}: {local} does not exist; give an existing directory.")
    if not local.is_dir():
        raise SourceError(f"{owner}: {local} is a file; give the model's directory.")
    if not os.access(local, os.R_OK | os.X_OK):
        raise SourceError(f"{owner}: {local} cannot be read (permission denied){_READ_FIX}")
    present = [n for n in needs if (local / n).is_file()]
    if not present:
        raise SourceError(
            f"{owner}: {local} holds none of {', '.join(needs)}; it is not a Hugging Face "
            "model directory (or the files are not there yet)."
        )
    files = [local / n for n in present] + sorted(local.glob("*.safetensors"))
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise SourceError(f"{owner}: {unreadable[0]} cannot be read (permission denied){_READ_FIX}")


def is_safetensors_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with ``model.safetensors`` or a sharded index."""
    path = Path(path)
    return (path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS_SINGLE).is_file()


def read_vocabulary(directory: str | os.PathLike) -> dict[str, int] | None:
    """A directory's tokenizer vocabulary as {token: id} (added tokens included), or None
    when it ships no tokenizer.

    ``tokenizer.json`` is read as JSON (no tokenizer library); only a directory with just a
    slow tokenizer (``tokenizer_config.json`` without ``tokenizer.json``) loads transformers.
    """
    directory = Path(directory)
    file = directory / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text())
        vocab = data.get("model", {}).get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
        added = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
        return {**vocab, **added}
    if (directory / "tokenizer_config.json").is_file():
        # Lazy: transformers (~5 s) only for a slow tokenizer; the lean CLI never loads it.
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory).get_vocab()
    return None


class JsonConfig(SimpleNamespace):
    """A model's ``config.json`` as attributes, read without transformers (no class defaults:
    a key absent from the file is absent here)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def read_config_json(name: str, path: str | os.PathLike) -> JsonConfig:
    """The raw ``config.json`` of a Hugging Face directory.

    Raises:
        SourceError: If it is missing or not a JSON object.
    """
    return JsonConfig(**read_json_object(Path(path) / "config.json", f"Model '{name}'"))


def read_json_object(file: Path, owner: str) -> dict[str, Any]:
    """A JSON file holding an object.

    Raises:
        SourceError: ``"<owner>: cannot read <file> (...)"`` or ``"... is not a JSON object"``.
    """
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"{owner}: cannot read {file} ({err}).") from err
    if not isinstance(data, dict):
        raise SourceError(f"{owner}: {file} is not a JSON object.")
    return data


def open_directory(name: str, path: str | os.PathLike, config: Any = None) -> SafetensorsSource:
    """Open a Hugging Face safetensors directory lazily (config now, tensors on demand).

    Args:
        name: The model's name in the pool.
        path: The directory.
        config: Its config when already read (e.g. a ``JsonConfig``); by default the
            transformers config (``AutoConfig``).

    Raises:
        SourceError: If its config or safetensors files cannot be read.
    """
    path = Path(path)
    if config is None:
        # Lazy: the lean CLI passes a JSON config and never imports transformers here.
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as err:
            raise SourceError(
                f"Model '{name}': cannot read {path / 'config.json'} ({err})."
            ) from err
    return SafetensorsSource(name, config, path)


#: Output dtype names accepted by ``dtype`` parameters.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_dtype(requested: Any, base: TensorSource) -> torch.dtype:
    """The output dtype: ``requested`` (a name or torch dtype), or the base's when None/auto.

    Raises:
        ValueError: For an unknown name.
    """
    if requested in (None, "auto"):
        requested = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
        if requested is None:
            requested = base.dtype(next(k for k in base.keys() if "embed_tokens" in k))
    if isinstance(requested, torch.dtype):
        return requested
    name = str(requested).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ValueError(f"Unknown dtype {requested!r}; valid: {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, DTYPE_NAMES[name])
