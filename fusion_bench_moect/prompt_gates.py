"""Router rows from prompts (gate modes ``hidden`` and ``cheap_embed``).

``hidden`` reads each layer's post-attention-norm output: that is exactly the tensor the
router multiplies, unlike the residual stream mergekit-moe reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .ops.routers import normalise_rows
from .progress import progress

log = logging.getLogger(__name__)

#: ``prompts`` entry whose prompts set the Qwen2-MoE shared expert's gate (mergekit-moe's
#: shared-expert prompts); without it the gate starts at ~0 (sigmoid 1/2).
SHARED_EXPERT_PROMPTS = "shared_expert"


def parse_prompts(
    prompts: Mapping[str, Any] | None, group_names: Sequence[str], mode: str
) -> list[tuple[list[str], list[str]]]:
    """Positive and negative prompts for every expert group.

    Accepts ``{name: [prompt, ...]}`` or ``{name: {positive: [...], negative: [...]}}``.

    Raises:
        ValueError: If prompts are missing for any group.
    """
    if not prompts:
        raise ValueError(
            f"gate_mode '{mode}' needs prompts: set `prompts` to a mapping from each expert "
            f"name ({', '.join(group_names)}) to a list of positive prompts."
        )
    parsed = []
    for name in group_names:
        entry = prompts.get(name)
        if entry is None:
            raise ValueError(
                f"gate_mode '{mode}': expert '{name}' has no prompts; give prompts for every "
                f"expert ({', '.join(group_names)})."
            )
        if isinstance(entry, str):
            positive, negative = [entry], []
        elif isinstance(entry, Mapping):
            positive, negative = (
                list(entry.get("positive") or []),
                list(entry.get("negative") or []),
            )
        else:
            positive, negative = list(entry), []
        if not positive:
            raise ValueError(f"gate_mode '{mode}': expert '{name}' has no positive prompts.")
        parsed.append((positive, negative))
    return parsed


@torch.no_grad()
def _mean_states(model: Any, tokenizer: Any, texts: Sequence[str], mode: str) -> torch.Tensor:
    """(L, H) mean over all tokens of ``texts`` of each layer's router input (or embeddings)."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    total = torch.zeros(len(layers), hidden, dtype=torch.float64)
    count = 0
    captured: list[torch.Tensor] = []
    hooks = []
    if mode == "hidden":
        for layer in layers:
            hooks.append(
                layer.post_attention_layernorm.register_forward_hook(
                    lambda _m, _i, out: captured.append(out[0].to(torch.float64))
                )
            )
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            captured.clear()
            if mode == "hidden":
                model(input_ids=ids)
                total += torch.stack([c.sum(0) for c in captured])
            else:
                emb = model.get_input_embeddings()(ids)[0].to(torch.float64)
                total += emb.sum(0).expand(len(layers), hidden)
            count += ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return total / max(count, 1)


def prompt_router_rows(
    model: Any,
    tokenizer: Any,
    group_prompts: Sequence[tuple[list[str], list[str]]],
    mode: str,
) -> list[torch.Tensor]:
    """Per layer, float32 (num_groups, H) normalised router rows from prompts.

    Args:
        model: The dense base causal LM.
        tokenizer: Its tokenizer.
        group_prompts: (positive, negative) prompts per expert group.
        mode: ``hidden`` or ``cheap_embed``.
    """
    model.eval()
    rows = []
    for positive, negative in progress(group_prompts, desc=f"Router rows from prompts ({mode})"):
        vec = _mean_states(model, tokenizer, positive, mode)
        if negative:
            vec = vec - _mean_states(model, tokenizer, negative, mode)
        rows.append(vec)
    stacked = torch.stack(rows, dim=1)  # (L, R, H)
    return [normalise_rows(layer_rows).to(torch.float32) for layer_rows in stacked]
