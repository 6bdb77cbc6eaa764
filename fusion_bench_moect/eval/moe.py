"""Read the MoE structure of a transformers causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE).

Works with transformers 4.57 and 5.x: the router of a sparse block is the ``gate``
sub-module (an ``nn.Linear`` in 4.x, a ``*TopKRouter`` in 5.x, both with a ``(E, H)``
``weight``) of ``layer.block_sparse_moe`` (Mixtral, 4.x) or ``layer.mlp`` (everything
else). Dense layers (``mlp_only_layers``, ``decoder_sparse_step``) have no router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["MoEInfo", "describe_moe", "decoder_layers", "moe_ct_record"]


@dataclass
class MoEInfo:
    """The routing structure of an MoE model.

    Attributes:
        model_type: ``config.model_type`` (e.g. ``"mixtral"``).
        num_experts: Routed experts per MoE layer E.
        top_k: Experts per token k.
        moe_layers: Decoder-layer index of each MoE layer, in ``router_logits`` order.
        routers: The router module of each MoE layer (``weight`` of shape ``(E, H)``).
        shared_expert: Whether the blocks also hold an always-on shared expert (Qwen2-MoE).
        num_layers: Total number of decoder layers.
    """

    model_type: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    routers: list[nn.Module] = field(repr=False)
    shared_expert: bool
    num_layers: int


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (``model.model.layers``), if any."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(model, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _sparse_block(layer: nn.Module, num_experts: int) -> nn.Module | None:
    for name in ("block_sparse_moe", "mlp"):
        block = getattr(layer, name, None)
        gate = getattr(block, "gate", None) if block is not None else None
        weight = getattr(gate, "weight", None)
        if weight is not None and weight.dim() == 2 and weight.shape[0] == num_experts:
            return block
    return None


def describe_moe(model: nn.Module) -> MoEInfo | None:
    """Describe the routing structure of ``model``; ``None`` for a dense model.

    Args:
        model: A transformers causal LM.

    Returns:
        An ``MoEInfo``, or ``None`` when the config names no experts or no layer has a router.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    layers = decoder_layers(model)
    if not num_experts or not top_k or layers is None:
        return None
    moe_layers, routers, shared = [], [], False
    for index, layer in enumerate(layers):
        block = _sparse_block(layer, int(num_experts))
        if block is None:
            continue
        moe_layers.append(index)
        routers.append(block.gate)
        shared = shared or getattr(block, "shared_expert", None) is not None
    if not moe_layers:
        return None
    return MoEInfo(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        num_experts=int(num_experts),
        top_k=int(top_k),
        moe_layers=moe_layers,
        routers=routers,
        shared_expert=shared,
        num_layers=len(layers),
    )


def moe_ct_record(model: nn.Module) -> dict[str, Any] | None:
    """The algorithm's record ``config.moe_ct`` (a plain dict), or ``None`` when absent."""
    record = getattr(getattr(model, "config", None), "moe_ct", None)
    if record is None:
        return None
    if hasattr(record, "items"):
        return dict(record)
    return None
