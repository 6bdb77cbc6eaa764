"""Qwen2-MoE output with shared-expert anchoring (the base FFN as an always-on expert)."""

from __future__ import annotations

from typing import Any

from .base import COMMON_LAYER_TENSORS
from .qwen3_moe import Qwen3MoeArchitecture


class Qwen2MoeArchitecture(Qwen3MoeArchitecture):
    name = "qwen2_moe"
    config_class_name = "Qwen2MoeConfig"
    model_class_name = "Qwen2MoeForCausalLM"
    has_shared_expert = True
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
        }
