"""The trained model as a Hugging Face checkpoint, written tensor by tensor (no gathering).

Training changes only the trainable parameters and the router biases; every other tensor is
the starting checkpoint's. So the output is the input's tensor list in the input's order and
layout (hub per-expert names, the same shards), where a trained tensor is gathered one
parameter at a time (FSDP2: ``DTensor.full_tensor``, every process joins) and split into its
hub tensors, and every frozen tensor is copied from the input file: bit-identical, in its
stored dtype, whatever the strategy, and a tied ``lm_head`` stays unwritten as in the input.
Peak memory over training is one parameter (e.g. a layer's fused experts) on each process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..io.mapped import fused_units, persistent_buffers
from ..io.sliced import ModelSource
from ..io.streaming import write_hub_checkpoint

log = logging.getLogger(__name__)


def changed_tensors(module: nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """What training may have changed: trainable parameters and persistent buffers (router
    biases), by model name, in the same order on every process."""
    found = {n: p for n, p in module.named_parameters() if n in trainable}
    found.update({n: module.get_buffer(n) for n in persistent_buffers(module)})
    return found


def _split(
    source: ModelSource, name: str, full: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """A model tensor as its hub tensors (a fused experts tensor: per expert, per projection)."""
    parts, experts = source.sources(name)
    if not experts:
        yield parts[0], full
        return
    per = len(parts) // experts
    for j in range(experts):
        start = 0
        for part in parts[j * per : (j + 1) * per]:
            rows = source.reader.entries[part].shape[0]
            yield part, full[j, start : start + rows].contiguous()
            start += rows


def _stream(
    source: ModelSource, changed: dict[str, torch.Tensor], writer: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub name, tensor) of the output; on the other processes, just the gathers."""
    done: set[str] = set()
    for name, tensor in changed.items():
        full = tensor.detach()
        if isinstance(full, DTensor):
            full = full.full_tensor()  # a collective: every process, same order
        if writer:
            yield from _split(source, name, full.cpu())
        done.update(source.sources(name)[0])
        del full
    if writer:
        for part in source.reader.entries:
            if part not in done:
                yield part, source.reader.read(part)


def save_streamed(
    fabric: Any,
    module: nn.Module,
    trainable: set[str],
    directory: Path,
    tokenizer: Any,
    extra_files: dict[str, str | bytes],
) -> None:
    """Write ``module`` (started from the checkpoint at ``module.name_or_path``) to
    ``directory``, atomically; rank 0 writes, every process gathers."""
    source = ModelSource(module, module.name_or_path)
    changed = changed_tensors(module, trainable)
    dtypes = {}
    for name, tensor in changed.items():
        dtypes.update(dict.fromkeys(source.sources(name)[0], tensor.dtype))
    specs = [
        (name, entry.shape, dtypes.get(name, entry.dtype))
        for name, entry in source.reader.entries.items()
    ]
    tensors = _stream(source, changed, fabric.is_global_zero)
    if fabric.is_global_zero:
        write_hub_checkpoint(
            directory,
            specs,
            tensors,
            module.config,
            tokenizer=tokenizer,
            generation_config_from=source.reader.directory,
            overwrite=True,
            units=fused_units(specs, source.arch.expert_proj_names),
            extra_files=extra_files,
        )
    else:
        for _ in tensors:
            pass
