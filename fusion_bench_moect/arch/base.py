"""The common interface of output architectures: one subclass per MoE family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# Config keys that describe the checkpoint, not the network, and must not leak into the MoE config.
_DROPPED_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "transformers_version",
    "auto_map",
    "quantization_config",
    "_name_or_path",
    "_commit_hash",
    "torch_dtype",
    "dtype",
    "moe_ct",
)


@dataclass
class MoELayerWeights:
    """Everything one MoE layer needs, stacked, in the output dtype.

    Attributes:
        router: (E, H) router matrix.
        gate_up: (E, 2 I_e, H) expert gate projections followed by up projections (the
            transformers-5 fused layout, so installing there needs no copy).
        down: (E, H, I_e) expert down projections.
        shared: Optional (gate (I, H), up (I, H), down (H, I)) of an always-on shared expert.
        shared_gate: Optional (1, H) weight of the shared expert's sigmoid gate.
    """

    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    shared_gate: torch.Tensor | None = None

    @property
    def expert_size(self) -> int:
        return self.down.shape[-1]

    @property
    def gate(self) -> torch.Tensor:
        return self.gate_up[:, : self.expert_size]

    @property
    def up(self) -> torch.Tensor:
        return self.gate_up[:, self.expert_size :]


class OutputArchitecture(ABC):
    """How one MoE family is configured and where its weights live.

    Subclasses set the class attributes and implement ``moe_config``; installing weights works the same for all families and both transformers
    layouts (fused 3-D experts in 5.x, per-expert modules in 4.x).
    """

    name: ClassVar[str]
    #: transformers class names (imported on use, so this module stays light).
    config_class_name: ClassVar[str]
    model_class_name: ClassVar[str]
    #: Per-expert projection names of the hub / transformers-4 layout (gate, up, down).
    expert_proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    #: Attribute of the decoder layer holding the MoE block in transformers 4.
    block_attr_v4: ClassVar[str] = "mlp"
    has_shared_expert: ClassVar[bool] = False
    #: Parameters the base may lack that are filled with zeros (name suffixes).
    zero_fill_suffixes: ClassVar[tuple[str, ...]] = ()

    def config_class(self) -> type:
        """The transformers config class."""
        import transformers

        return getattr(transformers, self.config_class_name)

    def model_class(self) -> type:
        """The transformers causal-LM class."""
        import transformers

        return getattr(transformers, self.model_class_name)

    @abstractmethod
    def moe_config(
        self, base_config: Any, num_experts: int, experts_per_token: int, expert_size: int
    ) -> dict[str, Any]:
        """Config keys specific to this family."""

    def build_config(
        self,
        base_config: Any,
        num_experts: int,
        experts_per_token: int,
        expert_size: int,
        dtype: torch.dtype,
    ) -> Any:
        """The MoE config: everything of the base config plus this family's MoE keys."""
        fields = {k: v for k, v in base_config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
        fields.update(self.moe_config(base_config, num_experts, experts_per_token, expert_size))
        config = self.config_class()(**fields)
        config.architectures = [self.model_class().__name__]
        # Newer configs keep ``dtype`` and make ``torch_dtype`` a deprecated alias.
        deprecated_alias = isinstance(getattr(type(config), "torch_dtype", None), property)
        setattr(config, "dtype" if deprecated_alias else "torch_dtype", dtype)
        return config

    def moe_block(self, decoder_layer: nn.Module) -> nn.Module:
        """The MoE block of a decoder layer in either transformers layout."""
        block = getattr(decoder_layer, self.block_attr_v4, None)
        return block if block is not None else decoder_layer.mlp

    def install(self, decoder_layer: nn.Module, weights: MoELayerWeights) -> None:
        """Put one layer's MoE weights into a model built on the meta device."""
        block = self.moe_block(decoder_layer)
        set_parameter(block.gate, "weight", weights.router)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5: fused 3-D tensors
            set_parameter(experts, "gate_up_proj", weights.gate_up)
            set_parameter(experts, "down_proj", weights.down)
        else:
            g_name, u_name, d_name = self.expert_proj_names
            for j, expert in enumerate(experts):
                # clone: per-expert parameters must not share storage, or saving drops them
                set_parameter(getattr(expert, g_name), "weight", weights.gate[j].clone())
                set_parameter(getattr(expert, u_name), "weight", weights.up[j].clone())
                set_parameter(getattr(expert, d_name), "weight", weights.down[j].clone())
        if self.has_shared_expert:
            assert weights.shared is not None and weights.shared_gate is not None
            for proj, tensor in zip(
                ("gate_proj", "up_proj", "down_proj"), weights.shared, strict=True
            ):
                set_parameter(getattr(block.shared_expert, proj), "weight", tensor)
            set_parameter(block.shared_expert_gate, "weight", weights.shared_gate)


def legacy_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """config.json keys that transformers 4.x needs and 5.x writes differently.

    4.x ignores ``rope_parameters`` (falling back to its own default theta, 1e6 for Mixtral,
    which silently changes every position but the first) and reads Qwen-MoE's expert count
    from ``num_experts`` (default 128), where 5.x writes ``num_local_experts``.
    """
    extra: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        extra["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            extra["rope_scaling"] = scaling
    if "num_local_experts" in config and "num_experts" not in config:
        if config.get("model_type") in ("qwen2_moe", "qwen3_moe"):
            extra["num_experts"] = config["num_local_experts"]
    return extra


def set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by ``tensor`` after checking its shape."""
    current = getattr(module, name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"Internal shape mismatch for {type(module).__name__}.{name}: model expects "
            f"{tuple(current.shape)}, built {tuple(tensor.shape)}."
        )
    setattr(module, name, nn.Parameter(tensor.contiguous()))
