"""Output architectures, one module per MoE family, behind ``OutputArchitecture``."""

from __future__ import annotations

from .base import MoELayer, OutputArchitecture
from .mixtral import MixtralArchitecture
from .qwen2_moe import Qwen2MoeArchitecture
from .qwen3_moe import Qwen3MoeArchitecture

ARCHITECTURES: dict[str, type[OutputArchitecture]] = {
    cls.name: cls for cls in (MixtralArchitecture, Qwen2MoeArchitecture, Qwen3MoeArchitecture)
}
#: The dense families we read, and the MoE family ``architecture: auto`` picks for each.
AUTO_ARCHITECTURE = {
    "llama": "mixtral",
    "mistral": "mixtral",
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
}

__all__ = ["ARCHITECTURES", "AUTO_ARCHITECTURE", "MoELayer", "OutputArchitecture", "resolve"]


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
