"""Find the MoE structure of a built transformers causal LM: blocks, routers, experts, anchors.

One place for every reader of a Mixtral, Qwen2-MoE, Qwen3-MoE or GLM4-MoE model (the output
architectures, evaluation, training, tests), in both transformers layouts: the MoE block is
``layer.block_sparse_moe`` (Mixtral, transformers 4) or ``layer.mlp``; its router is the
``gate`` sub-module (an ``nn.Linear`` in 4.x, a ``*TopKRouter`` in 5.x, both with an
``(E, H)`` ``weight``); its experts are fused 3-D tensors (5.x) or one module per expert
(4.x). Dense layers (``mlp_only_layers``, ``first_k_dense_replace``) have no router.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Attributes of a decoder layer that may hold its MoE block, in lookup order.
BLOCK_ATTRIBUTES = ("block_sparse_moe", "mlp")
#: Config keys that may hold the routed expert count, in lookup order.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: Attributes of an MoE block that may hold an always-on shared expert.
SHARED_ATTRIBUTES = ("shared_expert", "shared_experts")


@dataclass
class MoEInfo:
    """The routing structure of an MoE model.

    Attributes:
        model_type: The MoE model's ``config.model_type``.
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


def moe_block(layer: nn.Module, num_experts: int | None = None) -> nn.Module | None:
    """The MoE block of a decoder layer (its router has ``num_experts`` rows when given), or
    None for a dense layer."""
    for name in BLOCK_ATTRIBUTES:
        block = getattr(layer, name, None)
        gate = getattr(block, "gate", None) if block is not None else None
        weight = getattr(gate, "weight", None)
        if weight is not None and weight.dim() == 2:
            if num_experts is None or weight.shape[0] == num_experts:
                return block
    return None


def expert_triples(block: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per routed expert of an MoE block: (gate (I_e, H), up (I_e, H), down (H, I_e)), views
    of its parameters (no copies) in either transformers layout."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):  # transformers 5: fused 3-D tensors
        size = experts.down_proj.shape[-1]
        for gate_up, down in zip(experts.gate_up_proj, experts.down_proj, strict=True):
            yield gate_up[:size], gate_up[size:], down
        return
    for expert in experts:
        names = (
            ("w1", "w3", "w2") if hasattr(expert, "w1") else ("gate_proj", "up_proj", "down_proj")
        )
        gate, up, down = (getattr(expert, name).weight for name in names)
        yield gate, up, down


def is_moe_param(name: str) -> bool:
    """Whether a parameter name (``model.named_parameters()``) lies in a decoder layer's MoE
    block or dense FFN."""
    return ".mlp." in name or ".block_sparse_moe." in name


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
    num_experts = next(
        (getattr(config, key) for key in EXPERT_COUNT_KEYS if getattr(config, key, None)), None
    )
    top_k = getattr(config, "num_experts_per_tok", None)
    layers = decoder_layers(model)
    if not num_experts or not top_k or layers is None:
        return None
    moe_layers, routers, shared = [], [], False
    for index, layer in enumerate(layers):
        block = moe_block(layer, int(num_experts))
        if block is None:
            continue
        moe_layers.append(index)
        routers.append(block.gate)
        shared = shared or any(getattr(block, a, None) is not None for a in SHARED_ATTRIBUTES)
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


def anchor_experts(model: nn.Module) -> list[int]:
    """The anchor experts' indices recorded by the algorithm (empty when none or no record)."""
    record = moe_ct_record(model) or {}
    return [int(i) for i in record.get("anchor_experts") or []]
