"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning
Fabric's ``ModelParallelStrategy``, on GPUs and on CPU processes (gloo) alike.

``parallelize`` is the strategy's ``parallelize_fn`` (config/fabric/moe_fsdp2.yaml): every
decoder layer of the MoE becomes one FSDP unit (its stacked experts are sharded along the
expert dimension over the processes), then the model root. Fabric's device mesh is 2-D
(nodes x processes per node): parameters are sharded within a node and replicated across
nodes (HSDP), which is plain full sharding on one node.

Sharded parameters are DTensors; ``local_rows`` tells which rows of a parameter's first
dimension this process holds, so the frozen anchor rows can be zeroed and restored locally.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..inspection import decoder_layers

log = logging.getLogger(__name__)


def parallelize(
    model: nn.Module,
    device_mesh: Any,
    activation_checkpointing: bool = False,
    mixed_precision: str | bool = "auto",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer, then to the model.

    Args:
        model: The MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, ...).
        device_mesh: Fabric's mesh (``data_parallel`` x ``tensor_parallel``): replicate over
            the first dimension, shard over the second.
        activation_checkpointing: Recompute each decoder layer's activations in backward
            (transformers' gradient checkpointing, non-reentrant).
        mixed_precision: ``"auto"``: bf16 compute with fp32 master weights and gradient
            reduction on a CUDA device that has bf16, else full precision; True / False force it.
        reshard_after_forward: Free the gathered layer after its forward (ZeRO-3); False keeps
            it until backward (ZeRO-2, more memory, less communication).

    Returns:
        The same model, sharded in place (a model sharded already is returned as it is).
    """
    from torch.distributed.fsdp import (  # ~0.7 s, sharded runs only
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    if isinstance(model, FSDPModule):  # sharded while loading (training.loading)
        return model
    mesh = device_mesh
    if mixed_precision == "auto":
        mixed_precision = device_mesh.device_type == "cuda" and torch.cuda.is_bf16_supported()
    # frozen weights may be stored in bf16 beside float32 trainable ones: every parameter
    # is cast to the compute dtype when gathered (a no-op for those already in it)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision else torch.float32,
        reduce_dtype=torch.float32,
    )
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of ``tensor`` along dimension 0 and the global index of the first."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    # a private torch helper, loaded only for DTensors
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return tensor.to_local(), int(offset[0]) if offset else 0


def like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a local part) as a tensor sharded like ``reference`` when that is a DTensor
    of the same global shape as the value's owner; else ``value`` itself."""
    if isinstance(reference, DTensor) and value.dim() == reference.dim() and value.dim() > 0:
        return DTensor.from_local(
            value.to(reference.device_mesh.device_type),
            reference.device_mesh,
            reference.placements,
            run_check=False,
            shape=reference.shape,
            stride=reference.stride(),
        )
    return value


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0 (in CPU memory; empty on the other ranks)."""
    # ~0.9 s of distributed checkpointing that only sharded runs need
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def set_experts_implementation(model: nn.Module, name: str | None) -> None:
    """transformers 5's experts kernel for training (None: transformers' default,
    ``grouped_mm``, which is also deterministic on CPU, unlike ``batched_mm``, whose backward
    sums in a varying order there and so breaks bit-exact resume; docs/benchmarks.md).
    transformers 4 has per-expert modules and no choice: nothing to do."""
    if name is None or not hasattr(model, "set_experts_implementation"):
        return
    model.set_experts_implementation(name)
