"""The common interface of output architectures: one subclass per MoE family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
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

    def experts(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per expert: (gate (I_e, H), up (I_e, H), down (H, I_e)), views without copies."""
        size = self.expert_size
        for gate_up, down in zip(self.gate_up, self.down, strict=True):
            yield gate_up[:size], gate_up[size:], down


#: Tensors of one decoder layer outside the FFN that every family has (hub names after
#: ``model.layers.N.``).
COMMON_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)


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
    #: Whether some decoder layers can stay dense (transformers' ``mlp_only_layers``).
    supports_dense_layers: ClassVar[bool] = False
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
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """The MoE config: everything of the base config plus this family's MoE keys (and
        ``extra`` keys of the plan, e.g. ``mlp_only_layers``)."""
        fields = {k: v for k, v in base_config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
        fields.update(self.moe_config(base_config, num_experts, experts_per_token, expert_size))
        fields.update(extra or {})
        config = self.config_class()(**fields)
        config.architectures = [self.model_class_name]
        # Newer configs keep ``dtype`` and make ``torch_dtype`` a deprecated alias.
        deprecated_alias = isinstance(getattr(type(config), "torch_dtype", None), property)
        setattr(config, "dtype" if deprecated_alias else "torch_dtype", dtype)
        return config

    def layer_tensor_names(self, config: Any) -> tuple[str, ...]:
        """Non-FFN tensors of one decoder layer (names after ``model.layers.N.``) for ``config``.

        Families with extra attention tensors (biases, q/k norms) extend this; a test checks
        it against the transformers model of every family in both layouts.
        """
        return COMMON_LAYER_TENSORS

    def non_ffn_names(self, config: Any) -> list[str]:
        """Every non-FFN tensor of the output model as saved in the hub layout, in order."""
        names = ["model.embed_tokens.weight"]
        suffixes = self.layer_tensor_names(config)
        for layer in range(config.num_hidden_layers):
            names += [f"model.layers.{layer}.{suffix}" for suffix in suffixes]
        names.append("model.norm.weight")
        if not getattr(config, "tie_word_embeddings", False):
            names.append("lm_head.weight")
        return names

    def hub_block_prefix(self, layer: int) -> str:
        """Hub name prefix of layer ``layer``'s MoE block (e.g. ``model.layers.3.mlp``)."""
        return f"model.layers.{layer}.{self.block_attr_v4}"

    def hub_layer_tensors(
        self,
        layer: int,
        router: torch.Tensor,
        experts: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One MoE layer as (hub name, tensor) pairs: the per-expert layout every consumer loads.

        Args:
            layer: Decoder layer index.
            router: (E, H) router weight.
            experts: Per expert, in order: (gate (I_e, H), up (I_e, H), down (H, I_e)).
            shared: Qwen2-MoE: the shared expert's (gate, up, down).
            shared_gate: Qwen2-MoE: (1, H) weight of the shared expert's gate.
        """
        prefix = self.hub_block_prefix(layer)
        yield f"{prefix}.gate.weight", router
        names = self.expert_proj_names
        for j, triple in enumerate(experts):
            for proj, tensor in zip(names, triple, strict=True):
                yield f"{prefix}.experts.{j}.{proj}.weight", tensor
        if self.has_shared_expert:
            if shared is None or shared_gate is None:
                raise ValueError(f"The {self.name} output needs a shared expert and its gate.")
            for proj, tensor in zip(("gate_proj", "up_proj", "down_proj"), shared, strict=True):
                yield f"{prefix}.shared_expert.{proj}.weight", tensor
            yield f"{prefix}.shared_expert_gate.weight", shared_gate

    def module_hub_tensors(
        self, layer: int, decoder_layer: nn.Module
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The hub tensors of a built decoder layer's MoE block, in either transformers layout,
        as views of its parameters (no copies)."""
        block = self.moe_block(decoder_layer)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5: fused 3-D tensors
            size = experts.down_proj.shape[-1]
            triples: Iterable = (
                (gate_up[:size], gate_up[size:], down)
                for gate_up, down in zip(experts.gate_up_proj, experts.down_proj, strict=True)
            )
        else:
            triples = (
                tuple(getattr(expert, proj).weight for proj in self.expert_proj_names)
                for expert in experts
            )
        shared = shared_gate = None
        if self.has_shared_expert:
            mlp = block.shared_expert
            shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            shared_gate = block.shared_expert_gate.weight
        yield from self.hub_layer_tensors(layer, block.gate.weight, triples, shared, shared_gate)

    def model_hub_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor a checkpoint of ``model`` holds, under its hub name, without copies.

        Non-MoE tensors keep their state-dict names; each MoE block is written per expert; a
        tied ``lm_head`` is left out (it is the embedding).
        """
        layers = model.model.layers
        block_prefixes = [
            f"model.layers.{i}.{_child_name(layer, self.moe_block(layer))}."
            for i, layer in enumerate(layers)
        ]
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        emitted: set[int] = set()
        for key, tensor in model.state_dict().items():
            if key == "lm_head.weight" and tied:
                continue
            layer = _layer_index(key)
            if layer is not None and key.startswith(block_prefixes[layer]):
                if layer not in emitted:
                    emitted.add(layer)
                    yield from self.module_hub_tensors(layer, layers[layer])
                continue
            yield key, tensor

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


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}.")


def _layer_index(key: str) -> int | None:
    if not key.startswith("model.layers."):
        return None
    head = key[len("model.layers.") :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by ``tensor`` after checking its shape."""
    current = getattr(module, name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"Internal shape mismatch for {type(module).__name__}.{name}: model expects "
            f"{tuple(current.shape)}, built {tuple(tensor.shape)}."
        )
    setattr(module, name, nn.Parameter(tensor.contiguous()))
