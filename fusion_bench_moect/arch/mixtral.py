"""Mixtral output: top-k weights always renormalised; no attention biases, no q/k norms."""

from __future__ import annotations

from typing import Any

from .base import OutputArchitecture


class MixtralArchitecture(OutputArchitecture):
    name = "mixtral"
    config_class_name = "MixtralConfig"
    model_class_name = "MixtralForCausalLM"
    expert_proj_names = ("w1", "w3", "w2")
    block_attr_v4 = "block_sparse_moe"
    num_experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"

    def family_config(self, base_config: Any) -> dict[str, Any]:
        return {
            # Llama has no sliding window; Mistral's (if any) is kept.
            "sliding_window": getattr(base_config, "sliding_window", None),
            "router_jitter_noise": 0.0,
        }
