"""Qwen2-MoE output with shared-expert anchoring (the base FFN as an always-on expert)."""

from __future__ import annotations

from typing import Any

from .base import OutputArchitecture


class Qwen2MoeArchitecture(OutputArchitecture):
    name = "qwen2_moe"
    has_shared_expert = True
    # Qwen2-MoE always has q/k/v biases; Llama and Mistral bases get zeros there.
    zero_fill_suffixes = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")

    def config_class(self) -> type:
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig

    def model_class(self) -> type:
        from transformers import Qwen2MoeForCausalLM

        return Qwen2MoeForCausalLM

    def moe_config(
        self, base_config: Any, num_experts: int, experts_per_token: int, expert_size: int
    ) -> dict[str, Any]:
        return {
            "num_experts": num_experts,
            "num_experts_per_tok": experts_per_token,
            "moe_intermediate_size": expert_size,
            "shared_expert_intermediate_size": base_config.intermediate_size,
            "intermediate_size": base_config.intermediate_size,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "qkv_bias": True,
            "use_sliding_window": bool(getattr(base_config, "use_sliding_window", False)),
        }
