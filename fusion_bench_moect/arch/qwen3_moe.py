"""Qwen3-MoE output: fine-grained experts (up to 128), q/k norms kept from a Qwen3 base."""

from __future__ import annotations

from typing import Any

from .base import COMMON_LAYER_TENSORS, OutputArchitecture, PlanLayout


class Qwen3MoeArchitecture(OutputArchitecture):
    name = "qwen3_moe"
    config_class_name = "Qwen3MoeConfig"
    model_class_name = "Qwen3MoeForCausalLM"
    supports_dense_layers = True

    def layer_tensor_names(self, config: Any) -> tuple[str, ...]:
        names = COMMON_LAYER_TENSORS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
        if getattr(config, "attention_bias", False):
            names += tuple(f"self_attn.{p}_proj.bias" for p in "qkvo")
        return names

    def legacy_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        # 4.x reads the expert count from ``num_experts`` (default 128), 5.x writes
        # ``num_local_experts``.
        if "num_local_experts" in config and "num_experts" not in config:
            return {"num_experts": config["num_local_experts"]}
        return {}

    def plan_config(self, plan: PlanLayout, base_config: Any) -> dict[str, Any]:
        return {"mlp_only_layers": plan.dense_layers}

    def family_config(self, base_config: Any) -> dict[str, Any]:
        # Every layer sparse, top-k renormalised (Qwen-MoE's default is not to).
        return {
            "intermediate_size": base_config.intermediate_size,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
