"""Auxiliary router losses and their schedules.

The load-balancing loss (``balancing.Balancer.aux_loss``: the architecture's own
``output.aux_loss`` where transformers computes one, else ``ops.balancing``'s); we set the
model's coefficient to zero for the forward pass and add ``coefficient(step) * aux_loss``
ourselves, so the coefficient can ramp up linearly over the first steps. The router z-loss (ST-MoE, Zoph et al. 2022) keeps
router logits small: the mean over tokens of ``logsumexp(logits)^2``, averaged over layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def aux_loss_coefficient(step: int, coefficient: float, ramp_steps: int) -> float:
    """Coefficient of the load-balancing loss at optimiser step ``step`` (0-based).

    Linear from ``coefficient / ramp_steps`` at step 0 to ``coefficient`` at step
    ``ramp_steps - 1`` and after; ``ramp_steps <= 0`` means no ramp.
    """
    if ramp_steps <= 0:
        return float(coefficient)
    return float(coefficient) * min(1.0, (step + 1) / ramp_steps)


def router_z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over MoE layers of the mean over tokens of ``logsumexp(logits)^2``."""
    per_layer = [
        torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits
    ]
    return torch.stack(per_layer).mean()


def set_model_aux_coefficient(model: nn.Module, value: float) -> None:
    """Set the coefficient transformers multiplies ``aux_loss`` by inside ``loss``."""
    model.config.router_aux_loss_coef = float(value)
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = float(value)
