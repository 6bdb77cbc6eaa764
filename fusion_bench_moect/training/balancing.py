"""What ``balancing`` and ``aux_loss_scope`` ask of the training loop.

- The routing of a forward pass: the router logits the model returns (softmax routers), or,
  for sigmoid routers (GLM4-MoE), the logits and actually selected experts captured by hooks
  (``eval.capture.RouterCapture``): transformers' GLM4-MoE computes no load-balancing loss.
- The load-balancing loss (``ops.balancing.load_balancing_loss``, mean over MoE layers):
  transformers' own ``aux_loss`` for softmax families at ``micro_batch`` scope (unchanged);
  computed here for sigmoid routers, and at ``global_batch`` scope, where the selection
  counts c_i are all-reduced over the processes and summed over the step's micro-batches so
  far (with one micro-batch per step: exactly the global batch), while the probabilities P_i
  stay this micro-batch's (Qiu et al. 2025, Qwen's global-batch balancing).
- The bias update after each optimiser step: ``b_i += rate * sign(mean(c) - c_i)`` with c the
  step's counts all-reduced over every process and micro-batch (``StepStats.finish``), so every
  rank applies the same update to its copy of the (unsharded, replicated) buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..arch import router_biases, router_scoring
from ..eval.capture import RouterCapture
from ..inspection import MoEInfo
from ..ops.balancing import (
    bias_rate,
    expert_counts,
    load_balancing_loss,
    router_probabilities,
    update_bias,
)
from .config import TrainingConfig, uses_bias


def check_balancing(model: nn.Module, config: TrainingConfig) -> None:
    """Refuse ``balancing`` with a bias on a model whose routers have none, naming the family
    that has one (``arch.router_biases``' error)."""
    if uses_bias(config):
        try:
            router_biases(model)
        except ValueError as err:
            raise ValueError(f"balancing: {config.balancing} needs a router bias: {err}") from None


class Balancer:
    """The routing, load-balancing loss and bias updates of one training run.

    Args:
        fabric: The run's Fabric (all-reduces at ``global_batch`` scope).
        config: The training parameters.
        module: The model (unwrapped; its biases are updated in place).
        info: Its MoE structure.
    """

    def __init__(self, fabric: Any, config: TrainingConfig, module: nn.Module, info: MoEInfo):
        self.fabric, self.config = fabric, config
        self.scoring = router_scoring(info.model_type)
        self.num_experts = info.num_experts
        self.top_k = info.top_k
        self.capture = RouterCapture(info.routers) if self.scoring != "softmax" else None
        self.biases = [bias for _, bias in router_biases(module)] if uses_bias(config) else []
        names = {id(b): n for n, b in module.named_buffers()}
        self.bias_names = [names[id(b)] for b in self.biases]
        self._so_far: torch.Tensor | None = None  # the step's global counts + tokens so far

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """What the model's forward needs to expose its routing."""
        return {} if self.capture is not None else {"output_router_logits": True}

    def routing(self, out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Each MoE layer's router logits and (captured routers) selected experts."""
        if self.capture is not None:
            return self.capture.take()
        return list(out.router_logits), None

    def aux_loss(
        self, out: Any, logits: Sequence[torch.Tensor], selected: Sequence[torch.Tensor] | None
    ) -> torch.Tensor | None:
        """The load-balancing loss of this micro-batch (None: the model computed none)."""
        if self.capture is None and self.config.aux_loss_scope == "micro_batch":
            return getattr(out, "aux_loss", None)  # transformers' own, as before
        probs = [router_probabilities(x, self.scoring) for x in logits]
        if selected is None:  # softmax routers select the top-k of their probabilities
            selected = [torch.topk(p, self.top_k, dim=-1).indices for p in probs]
        counts = torch.stack([expert_counts(s.detach(), self.num_experts) for s in selected])
        tokens = float(probs[0].shape[0])
        if self.config.aux_loss_scope == "global_batch":
            counts, tokens = self._global_counts(counts, tokens)
        per_layer = [load_balancing_loss(p, c, tokens) for p, c in zip(probs, counts, strict=True)]
        return torch.stack(per_layer).mean()

    def _global_counts(self, counts: torch.Tensor, tokens: float) -> tuple[torch.Tensor, float]:
        packed = torch.cat([counts.flatten(), counts.new_tensor([tokens])])
        if self.fabric.world_size > 1:
            packed = self.fabric.all_reduce(packed, reduce_op="sum")
        self._so_far = packed if self._so_far is None else self._so_far + packed
        return self._so_far[:-1].view_as(counts), float(self._so_far[-1])

    def after_step(self, step: int, counts: torch.Tensor, record: dict[str, Any]) -> None:
        """After optimiser step ``step`` (0-based): update the biases from the step's global
        ``counts`` (MoE layers x experts) and add their range per layer to ``record``."""
        self._so_far = None
        if not self.biases:
            return
        rate = bias_rate(self.config.bias_update_rate, step, self.config.bias_update_ramp_steps)
        for bias, layer_counts in zip(self.biases, counts, strict=True):
            update_bias(bias, layer_counts, rate)
        ranges = [[float(b.min()), float(b.max())] for b in self.biases]
        record["bias_range"] = ranges
        record["bias_min"] = min(r[0] for r in ranges)
        record["bias_max"] = max(r[1] for r in ranges)

    def named_biases(self) -> dict[str, torch.Tensor]:
        """The updated biases by state-dict name (what step checkpoints save)."""
        return dict(zip(self.bias_names, self.biases, strict=True))

    def close(self) -> None:
        """Remove the capture hooks."""
        if self.capture is not None:
            self.capture.close()
