"""What trains in each stage, and the anchor experts kept bit-identical.

Stages (seed 004, MoE-LPR): ``router`` trains the routers only; ``experts`` trains the
routers and every non-anchor routed expert; ``router_then_experts`` is ``router`` for the
first ``router_warmup_steps`` optimiser steps, then ``experts``. The anchor experts, the
Qwen2-MoE shared expert (and its gate) and every non-FFN weight never train.

transformers 5 stacks the experts of a layer into 3-D tensors (``gate_up_proj``,
``down_proj`` of shape ``(E, ...)``), so an anchor is a row of a trainable tensor: its
gradient rows are zeroed before clipping and its values are written back after every
optimiser step (``AnchorGuard``), also under FSDP2, where those tensors are sharded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..inspection import MoEInfo, decoder_layers, describe_moe
from .config import STAGES
from .sharding import local_rows

log = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """Parameters of each stage and the anchor rows to keep.

    Attributes:
        info: The model's MoE structure.
        anchors: Anchor expert indices.
        routers: Router weights.
        experts: Routed-expert parameters that train in the ``experts`` stage.
        pinned: (stacked 3-D expert parameter, name) pairs holding anchor rows.
    """

    info: MoEInfo
    anchors: list[int]
    routers: list[nn.Parameter] = field(default_factory=list)
    experts: list[nn.Parameter] = field(default_factory=list)
    pinned: list[tuple[nn.Parameter, str]] = field(default_factory=list)


def expert_parameters(
    model: nn.Module, info: MoEInfo
) -> list[tuple[str, nn.Parameter, int | None]]:
    """Every routed-expert parameter with its name and expert index (None: stacks all)."""
    layers = decoder_layers(model)
    found: list[tuple[str, nn.Parameter, int | None]] = []
    for layer_idx in info.moe_layers:
        layer = layers[layer_idx]
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        experts = block.experts
        prefix = f"layers.{layer_idx}.experts"
        if isinstance(experts, nn.ModuleList):
            for j, expert in enumerate(experts):
                found += [(f"{prefix}.{j}.{n}", p, j) for n, p in expert.named_parameters()]
        else:
            found += [(f"{prefix}.{n}", p, None) for n, p in experts.named_parameters()]
    return found


def plan_training(model: nn.Module, stage: str, anchors: Sequence[int] | None) -> TrainingPlan:
    """Check ``stage`` and ``anchors`` against ``model`` and list what trains.

    Raises:
        ValueError: For an unknown stage, a dense model, or anchors the model does not have.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; valid: {', '.join(STAGES)}.")
    info = describe_moe(model)
    if info is None:
        raise ValueError(
            "moe_ct_training needs an MoE model (Mixtral, Qwen2-MoE or Qwen3-MoE); the pool's "
            "_pretrained_ has no routed experts. Upcycle it first with method=moe_ct_upcycling."
        )
    anchors = sorted({int(a) for a in (anchors or [])})
    bad = [a for a in anchors if not 0 <= a < info.num_experts]
    if bad:
        raise ValueError(
            f"Anchor expert(s) {bad} do not exist: the model has {info.num_experts} experts per "
            f"layer (0..{info.num_experts - 1}); fix anchor_experts."
        )
    plan = TrainingPlan(info=info, anchors=anchors)
    plan.routers = [router.weight for router in info.routers]
    for name, param, expert in expert_parameters(model, info):
        if expert is None:
            plan.experts.append(param)
            if anchors:
                plan.pinned.append((param, name))
        elif expert not in anchors:
            plan.experts.append(param)
    return plan


def apply_requires_grad(model: nn.Module, plan: TrainingPlan, stage: str) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what ``stage`` (at any point) trains; return it.

    ``router_then_experts`` unfreezes the experts from the start (DDP and FSDP fix the set of
    trainable parameters when they wrap the model); their gradients are dropped while the
    router warm-up lasts (``loop.TrainingLoop``).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = list(plan.routers) + (list(plan.experts) if stage != "router" else [])
    for param in trainable:
        param.requires_grad_(True)
    return trainable


class AnchorGuard:
    """Keeps the anchor rows of stacked expert tensors bit-identical.

    Built before the model is wrapped (it copies the anchor rows of the full tensors); the
    parameters are then looked up by name in the wrapped model. Under FSDP2 a stacked tensor
    is sharded along the expert dimension, so each process zeroes and restores the anchor
    rows it holds (``sharding.local_rows``).
    """

    def __init__(self, plan: TrainingPlan, saved: dict[str, torch.Tensor] | None = None) -> None:
        self.anchors = list(plan.anchors)
        index = torch.tensor(self.anchors, dtype=torch.long)
        if saved is None:  # the model holds its weights (else: the rows read from the files)
            saved = {
                name: param.detach()[index].clone()
                for param, name in plan.pinned
                if param.requires_grad  # a frozen stack (router stage) cannot change
            }
        self.saved = saved

    def __bool__(self) -> bool:
        return bool(self.saved)

    def _targets(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        layers = decoder_layers(model)
        found = []
        for name, value in self.saved.items():
            _, layer_idx, _, attr = name.split(".", 3)
            layer = layers[int(layer_idx)]
            block = getattr(layer, "block_sparse_moe", None) or layer.mlp
            found.append((getattr(block.experts, attr), value))
        return found

    def _local(self, start: int, rows: int) -> tuple[list[int], list[int]]:
        """(rows of this process's part, rows of the saved values) of the anchors it holds."""
        held = [(a - start, i) for i, a in enumerate(self.anchors) if start <= a < start + rows]
        return [h[0] for h in held], [h[1] for h in held]

    @torch.no_grad()
    def zero_grads(self, model: nn.Module) -> None:
        """Zero the anchor rows' gradients (before clipping, so they do not count)."""
        for param, _ in self._targets(model):
            if param.grad is not None:
                grad, start = local_rows(param.grad)
                mine, _ = self._local(start, grad.shape[0])
                grad[mine] = 0

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write the saved anchor rows back (after the optimiser step)."""
        for param, value in self._targets(model):
            data, start = local_rows(param.data)
            mine, saved = self._local(start, data.shape[0])
            data[mine] = value[saved].to(data.device, data.dtype)
