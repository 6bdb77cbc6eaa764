"""Open a checkpoint this package just wrote as a model whose weights are the files' pages.

``run()`` with ``save_checkpoint`` streams the MoE to disk (one layer in flight), then maps
it back: every safetensors shard is memory-mapped copy-on-write and every parameter is a
view of its bytes. Nothing is copied: pages are read on first use, and a weight that is
changed later (training) gets private memory then; the file never changes. The fused 3-D
expert tensors of transformers 5 are single views: the checkpoint is written in
``fused_order`` and ``fused_units`` keeps each of them in one shard, so the memory of the
returned model does not grow with the number of experts.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inspection import moe_block
from .streaming import _DTYPE_CODES, INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)

_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_EXPERT_TENSOR = re.compile(r"(.+)\.experts\.\d+\.(\w+)\.weight")


def fused_units(specs: Sequence[tuple[str, Any, Any]], proj_names: Sequence[str]) -> list[int]:
    """Lengths of the runs of ``specs`` (in ``fused_order``) that become one transformers-5
    tensor, for ``shard_layout``: per MoE block, every expert's gate and up projections, then
    every down projection; 1 for any other tensor.

    Args:
        specs: (hub name, shape, dtype) in file order.
        proj_names: The per-expert (gate, up, down) projection names.
    """
    gate, up, _ = proj_names
    units: list[int] = []
    previous = None
    for name, _, _ in specs:
        match = _EXPERT_TENSOR.fullmatch(name)
        key = None
        if match is not None:
            key = (match[1], match[2] in (gate, up))
        if key is not None and key == previous:
            units[-1] += 1
        else:
            units.append(1)
        previous = key
    return units


def safetensors_views(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a hub checkpoint (single file or shards) as a view of a private,
    copy-on-write memory map of its file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [SINGLE_FILE]
    views: dict[str, torch.Tensor] = {}
    for name in files:
        views.update(_file_views(directory / name))
    return views


def _file_views(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8 : 8 + header_len])
    data = torch.frombuffer(mapped, dtype=torch.uint8)  # keeps the map alive
    start = 8 + header_len
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = data[start + begin : start + end]
        dtype = _DTYPES[entry["dtype"]]
        if (start + begin) % dtype.itemsize:  # not aligned for a view: copy this one
            raw = raw.clone()
        views[name] = raw.view(dtype).view(entry["shape"])
    return views


def mapped_model(directory: str | os.PathLike, arch: Any, config: Any) -> nn.Module:
    """The model of ``config`` (family ``arch``) with the checkpoint in ``directory`` as its
    weights, without copies (eval mode, CPU).

    Raises:
        ValueError: When the checkpoint lacks a parameter of the model or has a tensor the
            model does not use (it was not written for this config).
    """
    # Lazy: accelerate (~3 s) only when a model is mapped, not on ``import io.mapped``.
    from accelerate import init_empty_weights

    views = safetensors_views(directory)
    with init_empty_weights(include_buffers=False):
        model = arch.model_class()(config)
    prefixes = block_prefixes(model, arch)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, _ in list(model.named_parameters()):
        if tied and name == "lm_head.weight":
            continue
        _set(model, name, _tensor_for(name, views, prefixes, arch))
    for name in persistent_buffers(model):
        _set(model, name, _tensor_for(name, views, prefixes, arch), buffer=True)
    if tied:
        model.tie_weights()
    if views:
        raise ValueError(
            f"{directory}: {len(views)} tensor(s) the {arch.name} model does not use, e.g. "
            f"'{next(iter(views))}'."
        )
    load_generation_config(model, Path(directory))
    model.eval()
    return model


def block_prefixes(model: nn.Module, arch: Any) -> dict[str, str]:
    """Model-name prefix -> hub-name prefix of every MoE block (``mlp.`` -> e.g.
    ``block_sparse_moe.``)."""
    prefixes = {}
    for i, layer in enumerate(model.model.layers):
        block = moe_block(layer)
        if block is None:
            continue
        child = next(n for n, m in layer.named_children() if m is block)
        prefixes[f"model.layers.{i}.{child}."] = arch.hub_block_prefix(i) + "."
    return prefixes


def _tensor_for(
    name: str, views: dict[str, torch.Tensor], prefixes: dict[str, str], arch: Any
) -> torch.Tensor:
    """The checkpoint tensor of model parameter ``name`` (consumed from ``views``)."""
    parts, experts = hub_sources(name, views, prefixes, arch)
    tensors = [views.pop(part) for part in parts]
    return _stacked(tensors, experts) if experts else tensors[0]


def hub_sources(
    name: str, available: Container[str], prefixes: dict[str, str], arch: Any
) -> tuple[list[str], int]:
    """The hub tensors that make model tensor ``name``, and the number of experts they stack
    (0: ``name`` is the one hub tensor listed). A fused transformers-5 tensor lists, per
    expert, its (gate, up) or (down) projections.

    Raises:
        ValueError: When ``available`` lacks them.
    """
    hub = name
    for model_prefix, hub_prefix in prefixes.items():
        if name.startswith(model_prefix):
            hub = hub_prefix + name[len(model_prefix) :]
            break
    if hub in available:
        return [hub], 0
    gate, up, down = arch.expert_proj_names
    for fused, projs in (("experts.gate_up_proj", (gate, up)), ("experts.down_proj", (down,))):
        if hub.endswith(fused):
            block = hub[: -len(fused)]
            parts: list[str] = []
            j = 0
            while f"{block}experts.{j}.{projs[0]}.weight" in available:
                parts += [f"{block}experts.{j}.{p}.weight" for p in projs]
                j += 1
            if parts:
                return parts, j
    raise ValueError(f"The checkpoint has no tensor for parameter '{name}' (looked for '{hub}').")


def _stacked(parts: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """(E, rows, cols) from per-expert 2-D ``parts`` (E x len(parts)/E of them) whose bytes
    follow each other in one file, as a view."""
    per = len(parts) // num_experts
    rows = sum(p.shape[0] for p in parts[:per])
    shape = (num_experts, rows, parts[0].shape[1])
    first, size = parts[0], parts[0].element_size()
    chained = all(
        p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and p.data_ptr() == q.data_ptr() + q.numel() * size
        for q, p in zip(parts, parts[1:], strict=False)
    )
    if not chained:
        raise RuntimeError(
            "Internal error: the experts of a fused tensor are not contiguous in one file "
            "(written without fused_order / fused_units)."
        )
    stride = (rows * shape[2], shape[2], 1)
    return first.as_strided(shape, stride, first.storage_offset())


def persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers a checkpoint holds (e.g. a router's selection bias)."""
    return [
        f"{module_name}.{attr}" if module_name else attr
        for module_name, module in model.named_modules()
        for attr in module._buffers
        if attr not in module._non_persistent_buffers_set
    ]


def _set(model: nn.Module, name: str, tensor: torch.Tensor, buffer: bool = False) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"Checkpoint tensor for '{name}' has shape {list(tensor.shape)}; the model "
            f"expects {list(current.shape)}."
        )
    if buffer:
        setattr(module, attr, tensor)
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=current.requires_grad))


def load_generation_config(model: nn.Module, directory: Path) -> None:
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        # Lazy: transformers' generation module (~1 s) only for a directory that has one.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
