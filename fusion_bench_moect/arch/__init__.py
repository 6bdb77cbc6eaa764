"""Output architectures, one module per MoE family, behind ``OutputArchitecture``.

Adding a family: one module with an ``OutputArchitecture`` subclass that answers the
interface's questions, registered in ``ARCHITECTURES`` below (and, if ``architecture: auto``
should pick it for a dense family, in ``AUTO_ARCHITECTURE``). The plan, the pipeline and the
engine only ask the family (``check_supported``, ``OutputArchitecture``'s methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..params import MoECTConfig
from .base import MoELayer, OutputArchitecture, PlanLayout, Unsupported, rope_legacy_fields
from .glm4_moe import Glm4MoeArchitecture
from .mixtral import MixtralArchitecture
from .qwen2_moe import Qwen2MoeArchitecture
from .qwen3_moe import Qwen3MoeArchitecture

ARCHITECTURES: dict[str, type[OutputArchitecture]] = {
    cls.name: cls
    for cls in (
        MixtralArchitecture,
        Qwen2MoeArchitecture,
        Qwen3MoeArchitecture,
        Glm4MoeArchitecture,
    )
}
#: The dense families we read, and the MoE family ``architecture: auto`` picks for each.
AUTO_ARCHITECTURE = {
    "llama": "mixtral",
    "mistral": "mixtral",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
}

__all__ = [
    "ARCHITECTURES",
    "AUTO_ARCHITECTURE",
    "MoELayer",
    "OutputArchitecture",
    "PlanLayout",
    "Unsupported",
    "auto_architecture",
    "check_base",
    "check_supported",
    "legacy_config_fields",
    "resolve",
    "router_biases",
    "router_scoring",
]


def resolve(requested: str, base_model_type: str) -> OutputArchitecture:
    """The output architecture for a base model.

    Raises:
        ValueError: For an unsupported base family or an unknown architecture name.
    """
    if base_model_type not in AUTO_ARCHITECTURE:
        raise ValueError(
            f"Unsupported base architecture '{base_model_type}'; supported dense bases: "
            f"{', '.join(AUTO_ARCHITECTURE)}."
        )
    name = AUTO_ARCHITECTURE[base_model_type] if requested == "auto" else requested
    if name not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture '{requested}'; valid: auto, {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[name]()


def auto_architecture(base_model_type: str) -> str:
    """The family ``architecture: auto`` picks for a dense base family (``auto`` if none)."""
    return AUTO_ARCHITECTURE.get(base_model_type, "auto")


def either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def check_supported(
    family: OutputArchitecture, config: MoECTConfig, moe_layers: Sequence[int], num_layers: int
) -> None:
    """Refuse a configuration the family cannot build, naming the families that can.

    Args:
        family: The output family.
        config: The build parameters.
        moe_layers: The decoder layers that become MoE (``moe_layers`` resolved).
        num_layers: The base's number of decoder layers.

    Raises:
        ValueError: For the first parameter ``family.unsupported`` names.
    """
    for item in family.unsupported(config, moe_layers, num_layers):
        capable = [
            cls.name
            for cls in ARCHITECTURES.values()
            if all(
                other.parameter != item.parameter
                for other in cls().unsupported(config, moe_layers, num_layers)
            )
        ]
        instead = f"use architecture: {either(capable)}, or " if capable else ""
        raise ValueError(f"{item.parameter}: {item.reason}; {instead}{item.fix}.")


def check_base(family: OutputArchitecture, base_config: Any) -> None:
    """Refuse a dense base whose attention the family cannot represent, naming what
    ``architecture: auto`` picks for it."""
    reason = family.base_reason(base_config)
    if reason is not None:
        raise ValueError(
            f"architecture: {reason}; use architecture: "
            f"{auto_architecture(base_config.model_type)} (what auto picks for "
            f"{base_config.model_type})."
        )


def router_biases(model: Any) -> list[tuple[int, Any]]:
    """Each MoE layer's router selection bias of a built model, as (layer index, the live (E,)
    float32 tensor): what aux-loss-free balancing updates in place.

    Raises:
        ValueError: For a model whose family has no router bias, naming the families that
            have one.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = ARCHITECTURES.get(model_type or "")
    if family is None or family.router_bias_name is None:
        capable = [n for n, cls in ARCHITECTURES.items() if cls.router_bias_name is not None]
        raise ValueError(
            f"A {model_type} model's router has no selection bias; build the model with "
            f"architecture: {either(capable)}."
        )
    return family().router_biases(model)


def legacy_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """config.json keys that transformers 4.x needs and 5.x writes differently (the rope keys,
    and those of the family named by ``model_type``)."""
    extra = rope_legacy_fields(config)
    family = ARCHITECTURES.get(config.get("model_type", ""))
    if family is not None:
        extra.update(family().legacy_fields(config))
    return extra


def router_scoring(model_type: str) -> str:
    """``sigmoid`` for a family whose routers score with sigmoids (GLM4-MoE), else
    ``softmax`` (also for model types we do not build)."""
    family = ARCHITECTURES.get(model_type)
    return family.router_scoring if family is not None else "softmax"
