"""Loading the MoE for training without any process holding all of it (FSDP2).

Under DDP every process holds the whole model, so it loads through the model pool as any
FusionBench model does. Under FSDP2 (Fabric's ``ModelParallelStrategy``) each process keeps
1/N of every parameter, and loading the whole model first would make host memory, not the
accelerators, the limit (issue 27: 8 processes of an 8x8B MoE would each read 95-190 GB).
So the model is built on the meta device (``empty_model``), frozen for the stage, sharded,
and each process reads only its own rows of every tensor from the safetensors files
(``shard_and_fill``, positioned reads: ``io.sliced``).

Per-process reads were chosen over rank 0 reading and broadcasting
(``set_model_state_dict(..., broadcast_from_rank0=True)``): rank 0 would still hold a whole
tensor per step plus its shard, every byte would cross the process group once more, and on a
node the files are in the page cache that all processes share, so N readers cost no more I/O.

Frozen weights keep the checkpoint's dtype (a bf16 MoE keeps bf16 attention, embeddings and
anchors); trainable parameters get float32 masters. FSDP2 requires one original dtype among
the trainable parameters of a unit only (torch 2.13, ``FSDPParamGroup._init_mp_dtypes``),
and ``sharding.parallelize`` casts every parameter to the compute dtype for the forward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn

from ..arch import ARCHITECTURES
from ..io.mapped import load_generation_config, persistent_buffers
from ..io.sliced import ModelSource, is_checkpoint
from .checkpoints import model_identity
from .freeze import AnchorGuard, TrainingPlan
from .sharding import local_rows

log = logging.getLogger(__name__)


def sharded_source(fabric: Any, modelpool: Any) -> Path | None:
    """The local checkpoint directory of the pool's ``_pretrained_`` when the run shards the
    model (FSDP2) and the pool names a directory; else None (the pool loads the model)."""
    if not isinstance(fabric.strategy, ModelParallelStrategy):
        return None
    entry = modelpool.get_model_config("_pretrained_")
    if not isinstance(entry, str | Path):
        entry = getattr(entry, "pretrained_model_name_or_path", None)
    if entry is None or not is_checkpoint(Path(str(entry)).expanduser()):
        return None
    return Path(str(entry)).expanduser().absolute()


def empty_model(directory: Path) -> nn.Module:
    """The model of ``directory`` with its parameters on the meta device, in the checkpoint's
    dtypes; buffers (rotary frequencies, router biases) are real and filled."""
    from accelerate import init_empty_weights  # ~3 s, sharded runs only
    from transformers import AutoConfig  # as above

    config = AutoConfig.from_pretrained(directory)
    arch = ARCHITECTURES[config.model_type]()
    with init_empty_weights(include_buffers=False):
        model = arch.model_class()(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one parameter, as from_pretrained makes it
    model.name_or_path = str(directory)
    source = ModelSource(model, directory)
    for name, param in model.named_parameters():
        param.data = torch.empty_like(param, dtype=source.dtype(name), device="meta")
    with torch.no_grad():
        for name in persistent_buffers(model):
            buffer = model.get_buffer(name)
            buffer.copy_(source.rows(name).to(buffer.dtype))
    load_generation_config(model, directory)
    return model


def is_empty(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are still on the meta device (``empty_model``)."""
    return any(p.is_meta for p in model.parameters())


def prepare(
    fabric: Any, model: nn.Module, plan: TrainingPlan, trainable: set[str], resumable: bool
) -> tuple[AnchorGuard, dict[str, Any], int]:
    """The anchor guard and the starting model's identity (when ``resumable``); an empty
    model is then sharded and filled. Returns them and the bytes this process read."""
    if not is_empty(model):
        identity = model_identity(model, trainable) if resumable else {}
        return AnchorGuard(plan), identity, 0
    source = ModelSource(model, model.name_or_path)
    names = {id(p): n for n, p in model.named_parameters()}
    anchor_rows = {  # only the anchors' rows
        name: torch.cat([source.rows(names[id(param)], a, a + 1) for a in plan.anchors])
        for param, name in plan.pinned
        if param.requires_grad  # frozen stacks cannot change
    }
    guard = AnchorGuard(plan, anchor_rows)
    identity = _identity(fabric, model, source, trainable) if resumable else {}
    before = source.reader.bytes_read
    shard_and_fill(fabric, model, source)
    read = source.reader.bytes_read - before
    total = sum(_nbytes(e.shape, e.dtype) for e in source.reader.entries.values())
    if fabric.is_global_zero:
        log.info(
            "Sharded load: each process reads its rows (rank 0: %.3f of the checkpoint's %.3f GB)",
            read / 1e9, total / 1e9,
        )  # fmt: skip
    return guard, identity, read


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def _identity(fabric: Any, model: nn.Module, source: ModelSource, trainable: set[str]) -> dict:
    """``checkpoints.model_identity`` of the checkpoint's tensors, read one at a time on
    rank 0 and broadcast."""
    identity = None
    if fabric.is_global_zero:
        canonical = {id(p): n for n, p in model.named_parameters()}  # tied: the first name

        def read(name: str, tensor: torch.Tensor) -> torch.Tensor:
            return source.rows(canonical.get(id(tensor), name)) if tensor.is_meta else tensor

        identity = model_identity(model, trainable, read)
    return fabric.broadcast(identity)


@torch.no_grad()
def shard_and_fill(fabric: Any, model: nn.Module, source: ModelSource) -> None:
    """Give trainable parameters float32 masters, shard the model with the strategy's
    ``parallelize_fn`` and read this process's rows of every parameter."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = torch.empty_like(param, dtype=torch.float32)
    strategy = fabric.strategy
    # Lightning's own materialisation would re-initialise the weights (``reset_parameters``)
    # and leave the rotary buffers uninitialised; ``parallelize`` skips a sharded model later
    strategy._parallelize_fn(model, strategy.device_mesh)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=strategy.root_device)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    for name, param in model.named_parameters():
        data, start = local_rows(param.data)
        rows = source.rows(name, start, start + data.shape[0]) if data.dim() else source.rows(name)
        data.copy_(rows)
