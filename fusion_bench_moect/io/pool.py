"""FusionBench model-pool entries as tensor sources: a safetensors directory or a PEFT LoRA
adapter is read lazily, anything else is loaded through the pool."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .lora import is_adapter_dir, open_adapter
from .sources import ModuleSource, SourceError, TensorSource, is_safetensors_dir, open_directory


def declared_model_path(modelpool: Any, name: str) -> Any:
    """What the pool gives for entry ``name``: a path or hub id, or a config (None if none)."""
    getter = getattr(modelpool, "get_model_path", None)
    try:
        return getter(name) if getter is not None else modelpool.get_model_config(name)
    except Exception:
        return None


def pool_model_path(modelpool: Any, name: str) -> Path | None:
    """The local directory behind a pool entry, or None when the pool must load it."""
    path = declared_model_path(modelpool, name)
    if isinstance(path, (str, os.PathLike)) and Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    return None


def open_source(modelpool: Any, name: str, base: TensorSource | None = None) -> TensorSource:
    """Open pool entry ``name`` lazily when it is a safetensors directory or a PEFT LoRA
    adapter directory (read over ``base``), else load it through the pool.

    Raises:
        SourceError: If the entry cannot be read.
    """
    path = pool_model_path(modelpool, name)
    if path is not None:
        if is_adapter_dir(path):
            return open_adapter(name, path, base, pool_model_path(modelpool, "_pretrained_"))
        if is_safetensors_dir(path):
            return open_directory(name, path)
    try:
        module = modelpool.load_model(name)
    except Exception as err:
        raise SourceError(f"Model '{name}' could not be loaded by the model pool: {err}") from err
    if not hasattr(module, "config") or not hasattr(module, "state_dict"):
        raise SourceError(
            f"Model '{name}' loaded as {type(module).__name__}, not a transformers causal LM."
        )
    return ModuleSource(name, module)
