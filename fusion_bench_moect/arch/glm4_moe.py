"""GLM4-MoE output: sigmoid router scores with a selection bias (``e_score_correction_bias``,
aux-loss-free balancing), group-limited routing (``n_group`` / ``topk_group``), an ungated
shared expert and leading dense layers (``first_k_dense_replace``), around Llama-style
attention (q/k/v biases with ``attention_bias``, Qwen3's q/k norms with ``use_qk_norm``).

Function preservation: the top-k sigmoid scores are renormalised (``norm_topk_prob``) and not
rescaled (``routed_scaling_factor: 1``), so identical experts give sum_j w_j f(x) = f(x)
exactly as Mixtral's renormalised softmax does; the bias starts at zero. The shared expert has
no gate (weight 1), so its down projection carries the share w itself (``shared_gate_factor``
1). Its width ``n_shared_experts x moe_intermediate_size`` is n FFNs of width I at
``moe_intermediate_size`` I/G: ``n_shared_experts = n G``. RoPE is made full
(``partial_rotary_factor: 1``, GLM's default is 0.5) and no multi-token-prediction layer is
declared (``num_nextn_predict_layers: 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..ops.routers import group_routing_problem
from ..params import MoECTConfig
from .base import COMMON_LAYER_TENSORS, OutputArchitecture, PlanLayout

#: The dense families whose attention has q/k/v biases always (others: ``attention_bias``).
_QKV_BIAS_BASES = ("qwen2",)
#: The dense families whose attention has per-head q/k RMS norms.
_QK_NORM_BASES = ("qwen3",)


class Glm4MoeArchitecture(OutputArchitecture):
    name = "glm4_moe"
    config_class_name = "Glm4MoeConfig"
    model_class_name = "Glm4MoeForCausalLM"
    has_shared_expert = True
    shared_expert_attr = "shared_experts"
    supports_group_routing = True
    gguf_vocabulary_from_base = True  # llama.cpp's _set_vocab_glm looks up [gMASK] & co.
    router_bias_name = "e_score_correction_bias"
    router_scoring = "sigmoid"
    # transformers 4 knows only ``n_routed_experts`` (5 maps ``num_local_experts`` onto it).
    num_experts_key = "n_routed_experts"
    # GLM4-MoE has no sliding-window attention (``base_reason`` refuses a base that uses it).
    dropped_base_keys = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")

    def dense_layers_reason(self, moe_layers: Sequence[int], num_layers: int) -> str | None:
        if list(moe_layers) == list(range(num_layers - len(moe_layers), num_layers)):
            return None
        return (
            f"the {self.name} output keeps only leading layers dense (first_k_dense_replace), "
            f"not {sorted(set(range(num_layers)) - set(moe_layers))} of {num_layers}"
        )

    def base_reason(self, base_config: Any) -> str | None:
        window = getattr(base_config, "sliding_window", None)
        if getattr(base_config, "use_sliding_window", True) is False or window is None:
            return None
        if window >= base_config.max_position_embeddings:
            return None  # never reached
        return (
            f"the {self.name} output has no sliding-window attention and the base uses "
            f"sliding_window={window}"
        )

    def routing_reason(self, num_experts: int, config: MoECTConfig) -> str | None:
        return group_routing_problem(
            num_experts,
            config.experts_per_token,
            config.granularity,
            config.n_group,
            config.topk_group,
        )

    def layer_tensor_names(self, config: Any) -> tuple[str, ...]:
        names = COMMON_LAYER_TENSORS
        if getattr(config, "use_qk_norm", False):
            names += ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
        if getattr(config, "attention_bias", False):
            names += tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
        return names

    def family_config(self, base_config: Any) -> dict[str, Any]:
        qkv_bias = base_config.model_type in _QKV_BIAS_BASES
        return {
            "attention_bias": qkv_bias or bool(getattr(base_config, "attention_bias", False)),
            "use_qk_norm": base_config.model_type in _QK_NORM_BASES,
            "partial_rotary_factor": 1.0,
            "num_nextn_predict_layers": 0,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            # the plan's values (plan_config) replace these
            "first_k_dense_replace": 0,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
        }

    def plan_config(self, plan: PlanLayout, base_config: Any) -> dict[str, Any]:
        return {
            "first_k_dense_replace": len(plan.dense_layers),
            # n FFNs of width I side by side, in units of moe_intermediate_size = I / G
            "n_shared_experts": len(plan.shared_ffns) * plan.granularity,
            "n_group": plan.n_group,
            "topk_group": plan.topk_group,
        }

    def legacy_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        # 5.x keeps the rotary fraction in ``rope_parameters``; 4.x reads the top-level key
        # and would otherwise take GLM's default 0.5.
        if config.get("partial_rotary_factor") is None:
            rope = config.get("rope_parameters") or {}
            return {"partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}
        return {}
