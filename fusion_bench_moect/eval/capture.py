"""The routers' logits and actual selections, captured by forward hooks.

Softmax routers (Mixtral, Qwen2-MoE, Qwen3-MoE) select the top-k of their logits, which the
model returns (``output_router_logits=True``). A sigmoid router with a selection bias and
group-limited top-k (GLM4-MoE) does not: transformers 4.57's GLM4-MoE returns no router logits
at all, and 5.x records only the logits. ``RouterCapture`` hooks each router and keeps what it
computed: transformers 5's router returns ``(logits, weights, indices)``, 4.57's
``(indices, weights)``, whose logits the hook recomputes as the router does (float32 linear
map of its input, differentiable for a load-balancing loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import router_scoring
from ..inspection import MoEInfo


class RouterCapture:
    """Hooks on MoE routers recording, per forward pass, each layer's logits ``(T, E)`` and
    selected experts ``(T, k)``.

    Args:
        routers: The router module of each MoE layer, in layer order.
    """

    def __init__(self, routers: Sequence[nn.Module]) -> None:
        self.logits: list[torch.Tensor | None] = [None] * len(routers)
        self.indices: list[torch.Tensor | None] = [None] * len(routers)
        self._handles = [
            router.register_forward_hook(partial(self._hook, i)) for i, router in enumerate(routers)
        ]

    def _hook(self, index: int, module: nn.Module, inputs: tuple, output: Any) -> None:
        if len(output) == 3:  # transformers 5: (router_logits, topk_weights, topk_indices)
            logits, indices = output[0], output[2]
        else:  # transformers 4.57: (topk_indices, topk_weights)
            indices = output[0]
            weight = module.weight
            hidden = inputs[0].reshape(-1, weight.shape[-1])
            logits = F.linear(hidden.float(), weight.float())
        self.logits[index], self.indices[index] = logits, indices

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The last forward pass's logits and selections (and forget them)."""
        if any(x is None for x in self.indices):
            raise RuntimeError("RouterCapture: a router did not run in the last forward pass.")
        logits, indices = list(self.logits), list(self.indices)
        self.logits = [None] * len(logits)
        self.indices = [None] * len(indices)
        return logits, indices  # type: ignore[return-value]

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def needs_capture(info: MoEInfo) -> bool:
    """Whether the model's selection must be captured (its routers are not softmax top-k)."""
    return router_scoring(info.model_type) != "softmax"
