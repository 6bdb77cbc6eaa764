"""FusionBench model-pool entries as tensor sources: a safetensors directory or a PEFT LoRA
adapter is read lazily, anything else is loaded through the pool."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fusion_bench.modelpool import CausalLMPool

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


def read_directories(modelpool: Any, **more: Any) -> dict[str, Path]:
    """The local directories a run reads, by name, that its output must not replace: the
    pool's ``_pretrained_`` and tokenizer (none for a bare model) and ``more`` (name: path or
    None); paths that are not local directories are left out."""
    named = dict(more)
    if not isinstance(modelpool, torch.nn.Module):
        named["_pretrained_"] = pool_model_path(modelpool, "_pretrained_")
        named["the pool's tokenizer"] = getattr(modelpool, "tokenizer", None)
    return {
        name: Path(path).expanduser()
        for name, path in named.items()
        if isinstance(path, (str, os.PathLike)) and Path(path).expanduser().is_dir()
    }


def model_kwargs_dtype(kwargs: Mapping[str, Any]) -> Any:
    """The dtype that ``model_kwargs`` ask for: ``torch_dtype`` (FusionBench's configs'
    spelling) when set, else ``dtype`` (transformers 5's). Our pools hold both keys, ``dtype``
    with their default and ``torch_dtype`` null, so a set ``torch_dtype`` is the user's."""
    torch_dtype = kwargs.get("torch_dtype")
    return torch_dtype if torch_dtype is not None else kwargs.get("dtype")


class MoECTCausalLMPool(CausalLMPool):
    """FusionBench's ``CausalLMPool`` (config/modelpool/) that takes ``model_kwargs.dtype``
    and ``model_kwargs.torch_dtype`` alike and hands transformers only ``dtype``: transformers
    5 warns that ``torch_dtype`` is deprecated even when it is null."""

    def get_model_kwargs(self) -> dict[str, Any]:
        kwargs = super().get_model_kwargs()
        dtype = model_kwargs_dtype(kwargs)
        kwargs.pop("torch_dtype", None)
        if dtype is not None:
            kwargs["dtype"] = dtype
        return kwargs


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
