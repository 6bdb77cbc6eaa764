"""Load balancing of MoE routers: the load-balancing loss and the aux-loss-free bias update
(pure tensor math, no I/O).

For one MoE layer with E routed experts, top-k routing and T tokens, c_i is the number of
tokens whose selected set contains expert i (sum_i c_i = k T) and P_i the mean over tokens of
the router's probability for expert i: softmax(logits) for softmax routers (Mixtral, Qwen),
sigmoid(logits) normalised over the experts for sigmoid routers (GLM4-MoE, DeepSeek-V3's
sequence-wise balance loss does the same). The load-balancing loss is Switch/Mixtral's

    L = E * sum_i (c_i / T) * P_i,

k at perfect balance, so one ``router_aux_loss_coef`` weighs it alike in every family (it is
transformers' ``load_balancing_loss_func`` for a single layer). The gradient flows through P
only; c comes from the actual selection (for GLM4-MoE: biased, group-limited top-k).

Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): after each optimiser step,
``b_i += rate * sign(mean(c) - c_i)`` with c counted over the global batch.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax", "sigmoid")


def router_probabilities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token probabilities over the experts, ``(T, E)`` in float32.

    Args:
        logits: Router logits ``(..., E)``.
        scoring: ``softmax`` or ``sigmoid`` (sigmoid scores normalised to sum 1 per token).
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True)
    raise ValueError(f"Unknown router scoring {scoring!r}; valid: {', '.join(SCORINGS)}.")


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """c_i: how many tokens selected each expert, as float64 ``(E,)`` (indices ``(T, k)``)."""
    flat = indices.reshape(-1).to(torch.int64)
    return torch.bincount(flat, minlength=num_experts).to(torch.float64)


def load_balancing_loss(
    probabilities: torch.Tensor, counts: torch.Tensor, tokens: float
) -> torch.Tensor:
    """``E * sum_i (c_i / tokens) * P_i`` with P the mean of ``probabilities`` over its tokens.

    Args:
        probabilities: ``(T, E)`` router probabilities (differentiable).
        counts: ``(E,)`` selection counts, of these tokens (micro-batch scope) or of more
            (global-batch scope: counts and ``tokens`` summed over processes and micro-batches).
        tokens: The number of tokens behind ``counts``.
    """
    num_experts = probabilities.shape[-1]
    fraction = (counts / tokens).to(probabilities)
    return num_experts * (fraction * probabilities.mean(dim=0)).sum()


def bias_rate(rate: float, step: int, ramp_steps: int) -> float:
    """The bias update rate at optimiser step ``step`` (0-based): linear from
    ``rate / ramp_steps`` to ``rate`` over the first ``ramp_steps`` steps (0: no ramp)."""
    if ramp_steps <= 0:
        return float(rate)
    return float(rate) * min(1.0, (step + 1) / ramp_steps)


@torch.no_grad()
def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """``bias += rate * sign(mean(counts) - counts)`` in place: an overloaded expert's bias
    falls, an underloaded one's rises, equal loads leave it."""
    counts = counts.to(device=bias.device, dtype=torch.float64)
    step = torch.sign(counts.mean() - counts) * rate
    bias.add_(step.to(bias.dtype))
