"""Qwen2-MoE output with shared-expert anchoring (the base FFN as an always-on expert).

Two details keep the output loadable by llama.cpp (its own ``convert_hf_to_gguf.py``):
its qwen2moe graph has no tied output matrix, so ``lm_head.weight`` is always written
(a copy of the embedding for a tied base, ``tie_word_embeddings: false``); and it computes
the shared expert's sigmoid gate as ``silu(x) / x``, NaN at exactly ``x = 0``, so the gate
starts at a tiny nonzero weight (``SHARED_GATE_INIT``) instead of zero.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import COMMON_LAYER_TENSORS, PlanLayout
from .qwen3_moe import Qwen3MoeArchitecture

#: Every weight of the shared expert's gate at initialisation. sigmoid(x) rounds to exactly
#: 1/2 for |x| < 2**-25 (float32), so transformers sees the zero-gate model bit for bit,
#: while llama.cpp's silu(x) / x needs x != 0.
SHARED_GATE_INIT = 1e-30


def initial_shared_gate(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The (1, H) shared-expert gate weight: ``SHARED_GATE_INIT``, or the smallest positive
    value of ``dtype`` where that underflows (float16), so the gate is never exactly zero."""
    info = torch.finfo(dtype)
    value = max(SHARED_GATE_INIT, info.tiny * info.eps)  # tiny * eps: smallest subnormal
    return torch.full((1, hidden_size), value, dtype=dtype)


class Qwen2MoeArchitecture(Qwen3MoeArchitecture):
    name = "qwen2_moe"
    config_class_name = "Qwen2MoeConfig"
    model_class_name = "Qwen2MoeForCausalLM"
    has_shared_expert = True
    has_shared_gate = True
    # sigmoid(~0) = 1/2 (see ``initial_shared_gate``): the shared FFNs' down projections x 2.
    shared_gate_factor = 2.0
    # Qwen2-MoE always has q/k/v biases; Llama and Mistral bases get zeros there.
    zero_fill_suffixes = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")

    def layer_tensor_names(self, config: Any) -> tuple[str, ...]:
        if not getattr(config, "qkv_bias", True):
            return COMMON_LAYER_TENSORS
        return COMMON_LAYER_TENSORS + tuple(f"self_attn.{p}_proj.bias" for p in "qkv")

    def moe_config(
        self, base_config: Any, num_experts: int, experts_per_token: int, expert_size: int
    ) -> dict[str, Any]:
        return {
            **super().moe_config(base_config, num_experts, experts_per_token, expert_size),
            "shared_expert_intermediate_size": base_config.intermediate_size,
            "qkv_bias": True,
            "use_sliding_window": bool(getattr(base_config, "use_sliding_window", False)),
            # llama.cpp's qwen2moe needs an explicit output matrix (see the module docstring).
            "tie_word_embeddings": False,
        }

    def shared_gate_init(self, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        return initial_shared_gate(hidden_size, dtype)

    def plan_config(self, plan: PlanLayout, base_config: Any) -> dict[str, Any]:
        # The shared expert is n FFNs of width I side by side.
        width = base_config.intermediate_size * len(plan.shared_ffns)
        return {**super().plan_config(plan, base_config), "shared_expert_intermediate_size": width}

    def llama_cpp_notes(
        self, num_experts: int, experts_per_token: int, shared_expert_share: float
    ) -> list[str]:
        notes = super().llama_cpp_notes(num_experts, experts_per_token, shared_expert_share)
        if experts_per_token < num_experts and shared_expert_share < 1:
            notes.append(
                "llama.cpp's qwen2moe graph ignores norm_topk_prob (it never renormalises the "
                f"top-{experts_per_token} routing weights), so a GGUF of this Qwen2-MoE will "
                "not reproduce it; for llama.cpp set experts_per_token=num_experts "
                f"({num_experts}) or shared_expert_share=1, or use architecture=mixtral "
                "(Llama/Mistral bases)."
            )
        return notes
