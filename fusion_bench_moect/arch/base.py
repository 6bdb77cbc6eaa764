"""The common interface of output architectures: one subclass per MoE family.

Everything the plan, the pipeline and the engine need to know about a family is asked here:
what of a configuration it cannot build (``unsupported``), which layers it can keep dense,
its shared expert and that expert's gate, the config keys a plan adds, and what llama.cpp
would get wrong. Generic code never tests a family's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from .. import inspection
from ..params import MoECTConfig
from ..prompt_gates import SHARED_EXPERT_PROMPTS

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


#: One expert group (one complete FFN split into G experts): gate (G, I_e, H), up (G, I_e, H),
#: down (G, H, I_e), in the output dtype.
ExpertSlices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class MoELayer:
    """One MoE layer's weights in the output dtype: the router and the shared expert computed,
    the routed experts computed lazily, one group at a time, by iterating ``groups`` (once).

    Attributes:
        index: Decoder layer index.
        router: (E, H) router matrix.
        groups: The expert groups in expert order, a one-pass iterator of ``ExpertSlices``.
        expert_size: I_e, the intermediate size of one expert.
        shared: Families with a shared expert: its (gate (nI, H), up (nI, H), down (H, nI)).
        shared_gate: Families whose shared expert has a gate: its (1, H) weight.
        router_bias: Families whose router has a selection bias: its (E,) float32 values.
    """

    index: int
    router: torch.Tensor
    groups: Iterator[ExpertSlices]
    expert_size: int
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    shared_gate: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def experts(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per expert, in order: (gate (I_e, H), up (I_e, H), down (H, I_e)); consumes ``groups``."""
        for gate, up, down in self.groups:
            for j in range(gate.shape[0]):
                yield gate[j], up[j], down[j]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts stacked as (gate_up (E, 2 I_e, H), down (E, H, I_e)), the transformers-5
        fused layout (installing there needs no copy); consumes ``groups``."""
        hidden, size = self.router.shape[1], self.expert_size
        gate_up = torch.empty(self.num_experts, 2 * size, hidden, dtype=self.router.dtype)
        down = torch.empty(self.num_experts, hidden, size, dtype=self.router.dtype)
        lo = 0
        for gate, up, group_down in self.groups:
            hi = lo + gate.shape[0]
            gate_up[lo:hi, :size] = gate
            gate_up[lo:hi, size:] = up
            down[lo:hi] = group_down
            lo = hi
        if lo != self.num_experts:
            raise RuntimeError(
                f"Layer {self.index}: built {lo} experts, planned {self.num_experts}."
            )
        return gate_up, down


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


class PlanLayout(Protocol):
    """What a family's ``plan_config`` reads of an expert plan, as plain values
    (``plan.MoEPlan`` has them): the plan imports the families, never the reverse."""

    granularity: int
    n_group: int
    topk_group: int

    @property
    def dense_layers(self) -> list[int]:
        """Decoder layers that stay dense."""

    @property
    def shared_ffns(self) -> Sequence[Any]:
        """The FFNs concatenated into the shared expert."""


@dataclass(frozen=True)
class Unsupported:
    """One parameter of a configuration that a family cannot build.

    Attributes:
        parameter: The parameter (e.g. ``moe_layers``, ``prompts.shared_expert``).
        reason: Why, naming the family (e.g. ``the mixtral output has no shared expert``).
        fix: What to do instead of choosing another family (e.g. ``leave it unset``).
    """

    parameter: str
    reason: str
    fix: str


class OutputArchitecture(ABC):
    """How one MoE family is configured, what it can build and where its weights live.

    Subclasses set the class attributes and implement ``family_config``; installing weights
    works the same for all families and both transformers layouts (fused 3-D experts in 5.x,
    per-expert modules in 4.x).
    """

    name: ClassVar[str]
    #: transformers class names (imported on use, so this module stays light).
    config_class_name: ClassVar[str]
    model_class_name: ClassVar[str]
    #: Per-expert projection names of the hub / transformers-4 layout (gate, up, down).
    expert_proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    #: Attribute of the decoder layer holding the MoE block in transformers 4.
    block_attr_v4: ClassVar[str] = "mlp"
    #: An always-on shared expert beside the routed ones (its FFNs: ``shared_experts``).
    has_shared_expert: ClassVar[bool] = False
    #: Attribute of the MoE block (and hub name) holding the shared expert.
    shared_expert_attr: ClassVar[str] = "shared_expert"
    #: A (1, H) gate on the shared expert's output (``shared_gate_init``, ``prompts``).
    has_shared_gate: ClassVar[bool] = False
    #: 1 / the shared expert's initial gate value: the factor on its down projection that
    #: makes its output the share ``shared_expert_share`` (2 for a sigmoid gate at 0).
    shared_gate_factor: ClassVar[float] = 1.0
    #: Whether any decoder layers can stay dense (transformers' ``mlp_only_layers``).
    supports_dense_layers: ClassVar[bool] = False
    #: Whether the router can limit a token's experts to its best groups (``n_group``).
    supports_group_routing: ClassVar[bool] = False
    #: llama.cpp's converter gives this family a vocabulary of its own (special tokens looked
    #: up by name) that a base of another family lacks: convert with the base's vocabulary.
    gguf_vocabulary_from_base: ClassVar[bool] = False
    #: Name of the router's (E,) buffer added to the scores for top-k selection only
    #: (aux-loss-free balancing), or None.
    router_bias_name: ClassVar[str | None] = None
    #: The router's per-token probabilities: ``softmax`` of the logits, or ``sigmoid`` (its
    #: selection then is not a top-k of the logits and the trainer captures it).
    router_scoring: ClassVar[str] = "softmax"
    #: Config keys of the routed expert count and of one expert's intermediate size.
    num_experts_key: ClassVar[str] = "num_experts"
    expert_size_key: ClassVar[str] = "moe_intermediate_size"
    #: Parameters the base may lack that are filled with zeros (name suffixes).
    zero_fill_suffixes: ClassVar[tuple[str, ...]] = ()
    #: Base config keys this family has no use for (not copied into its config).
    dropped_base_keys: ClassVar[tuple[str, ...]] = ()

    def config_class(self) -> type:
        """The transformers config class."""
        import transformers  # lazily: planning and streaming never need transformers' classes

        return getattr(transformers, self.config_class_name)

    def model_class(self) -> type:
        """The transformers causal-LM class."""
        import transformers  # lazily, as in config_class

        return getattr(transformers, self.model_class_name)

    # -- what the family can build ---------------------------------------------------------

    def unsupported(
        self, config: MoECTConfig, moe_layers: Sequence[int], num_layers: int
    ) -> list[Unsupported]:
        """What of ``config`` this family cannot build (empty: everything).

        Args:
            config: The build parameters.
            moe_layers: The decoder layers that become MoE (``moe_layers`` resolved).
            num_layers: The base's number of decoder layers.
        """
        found = []
        if config.moe_layers is not None:
            reason = self.dense_layers_reason(moe_layers, num_layers)
            if reason is not None:
                found.append(Unsupported("moe_layers", reason, "leave moe_layers unset"))
        if config.shared_experts is not None and not self.has_shared_expert:
            found.append(
                Unsupported(
                    "shared_experts",
                    f"the {self.name} output has no shared expert",
                    "leave shared_experts unset",
                )
            )
        if (config.n_group, config.topk_group) != (1, 1) and not self.supports_group_routing:
            found.append(
                Unsupported(
                    "n_group",
                    f"the {self.name} output has no group-limited routing",
                    "leave n_group and topk_group at 1",
                )
            )
        prompts = config.prompts
        if isinstance(prompts, dict) and SHARED_EXPERT_PROMPTS in prompts:
            if not self.has_shared_gate:
                found.append(
                    Unsupported(
                        f"prompts.{SHARED_EXPERT_PROMPTS}",
                        f"sets the shared expert's gate, which the {self.name} output has not",
                        "drop that entry",
                    )
                )
        return found

    def dense_layers_reason(self, moe_layers: Sequence[int], num_layers: int) -> str | None:
        """Why the layers outside ``moe_layers`` cannot stay dense in this family (None: they
        can)."""
        if self.supports_dense_layers:
            return None
        return f"the {self.name} output makes every layer MoE and cannot keep dense layers"

    def base_reason(self, base_config: Any) -> str | None:
        """Why this family cannot represent the dense base's attention (None: it can); the
        tensors themselves are checked by name (``build.plan_non_ffn``)."""
        return None

    def routing_reason(self, num_experts: int, config: MoECTConfig) -> str | None:
        """Why the routing parameters do not fit ``num_experts`` experts (None: they do)."""
        return None

    def shared_gate_init(self, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The (1, H) initial weight of the shared expert's gate (families that have one)."""
        raise ValueError(f"The {self.name} output has no shared expert gate.")

    def initial_router_bias(self, num_experts: int) -> torch.Tensor | None:
        """The (E,) float32 selection bias of a new router: zeros (None without one)."""
        if self.router_bias_name is None:
            return None
        return torch.zeros(num_experts, dtype=torch.float32)

    def router_biases(self, model: nn.Module) -> list[tuple[int, torch.Tensor]]:
        """Each MoE layer's router bias buffer of a built model, as (layer index, the live
        (E,) tensor): what a trainer updates in place for aux-loss-free balancing.

        Raises:
            ValueError: If this family's router has no bias.
        """
        if self.router_bias_name is None:
            raise ValueError(f"The {self.name} output's router has no selection bias.")
        found = []
        for index, layer in enumerate(inspection.decoder_layers(model) or []):
            block = inspection.moe_block(layer)
            if block is not None:
                found.append((index, getattr(block.gate, self.router_bias_name)))
        return found

    def plan_config(self, plan: PlanLayout, base_config: Any) -> dict[str, Any]:
        """Config keys that depend on the plan beyond the expert count (dense layers, the
        shared expert's width)."""
        return {}

    def llama_cpp_notes(
        self, num_experts: int, experts_per_token: int, shared_expert_share: float
    ) -> list[str]:
        """What is known to go wrong when this output runs in llama.cpp, each with its fix."""
        notes = []
        if num_experts & (num_experts - 1):
            lower = 1 << (num_experts.bit_length() - 1)
            notes.append(
                f"num_experts={num_experts} is not a power of two: llama.cpp's GPU top-k needs "
                f"one (llama.cpp issue 5213); use {lower} or {2 * lower} experts if the model "
                "will run in llama.cpp on a GPU."
            )
        return notes

    # -- its config ------------------------------------------------------------------------

    def moe_config(
        self, base_config: Any, num_experts: int, experts_per_token: int, expert_size: int
    ) -> dict[str, Any]:
        """The MoE config keys: expert count, top-k, expert size, then ``family_config``."""
        return {
            self.num_experts_key: num_experts,
            "num_experts_per_tok": experts_per_token,
            self.expert_size_key: expert_size,
            **self.family_config(base_config),
        }

    @abstractmethod
    def family_config(self, base_config: Any) -> dict[str, Any]:
        """Further config keys specific to this family."""

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
        dropped = (*_DROPPED_CONFIG_KEYS, *self.dropped_base_keys)
        fields = {k: v for k, v in base_config.to_dict().items() if k not in dropped}
        fields.update(self.moe_config(base_config, num_experts, experts_per_token, expert_size))
        fields.update(extra or {})
        config = self.config_class()(**fields)
        config.architectures = [self.model_class_name]
        # Newer configs keep ``dtype`` and make ``torch_dtype`` a deprecated alias.
        deprecated_alias = isinstance(getattr(type(config), "torch_dtype", None), property)
        setattr(config, "dtype" if deprecated_alias else "torch_dtype", dtype)
        return config

    def legacy_fields(self, config: dict[str, Any]) -> dict[str, Any]:
        """config.json keys of this family that transformers 4.x needs and 5.x writes
        differently (besides the rope keys every family gets)."""
        return {}

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
        fused_order: bool = False,
        *,
        router_bias: torch.Tensor | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One MoE layer as (hub name, tensor) pairs: the per-expert layout every consumer loads.

        Args:
            layer: Decoder layer index.
            router: (E, H) router weight.
            experts: Per expert, in order: (gate (I_e, H), up (I_e, H), down (H, I_e)).
            shared: Families with a shared expert: its (gate, up, down).
            shared_gate: Families whose shared expert has a gate: its (1, H) weight.
            fused_order: Every expert's gate and up first, then every down: in a file, the
                bytes of transformers 5's fused ``gate_up_proj`` and ``down_proj`` are then
                contiguous (``io.mapped``). Holds the layer's experts until all are yielded.
            router_bias: Families whose router has a selection bias: its (E,) values.
        """
        prefix = self.hub_block_prefix(layer)
        yield f"{prefix}.gate.weight", router
        if self.router_bias_name is not None:
            if router_bias is None:
                raise ValueError(f"The {self.name} output needs its router's bias.")
            yield f"{prefix}.gate.{self.router_bias_name}", router_bias
        gate, up, down = self.expert_proj_names
        if fused_order:
            experts = list(experts)
            for j, (g, u, _) in enumerate(experts):
                yield f"{prefix}.experts.{j}.{gate}.weight", g
                yield f"{prefix}.experts.{j}.{up}.weight", u
            for j, (_, _, d) in enumerate(experts):
                yield f"{prefix}.experts.{j}.{down}.weight", d
        else:
            for j, triple in enumerate(experts):
                for proj, tensor in zip((gate, up, down), triple, strict=True):
                    yield f"{prefix}.experts.{j}.{proj}.weight", tensor
        if self.has_shared_expert:
            self._check_shared(shared, shared_gate)
            for proj, tensor in zip(("gate_proj", "up_proj", "down_proj"), shared, strict=True):
                yield f"{prefix}.{self.shared_expert_attr}.{proj}.weight", tensor
            if self.has_shared_gate:
                yield f"{prefix}.shared_expert_gate.weight", shared_gate

    def moe_block(self, decoder_layer: nn.Module) -> nn.Module:
        """The MoE block of a decoder layer in either transformers layout."""
        block = inspection.moe_block(decoder_layer)
        if block is None:
            raise ValueError(f"Decoder layer {type(decoder_layer).__name__} has no MoE block.")
        return block

    def install(self, decoder_layer: nn.Module, layer: MoELayer) -> None:
        """Put one layer's MoE weights into a model built on the meta device."""
        block = self.moe_block(decoder_layer)
        set_parameter(block.gate, "weight", layer.router)
        if self.router_bias_name is not None:
            if layer.router_bias is None:
                raise ValueError(f"The {self.name} output needs its router's bias.")
            set_buffer(block.gate, self.router_bias_name, layer.router_bias)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5: fused 3-D tensors
            gate_up, down = layer.stacked()
            set_parameter(experts, "gate_up_proj", gate_up)
            set_parameter(experts, "down_proj", down)
        else:
            for expert, triple in zip(experts, layer.experts(), strict=True):
                for proj, tensor in zip(self.expert_proj_names, triple, strict=True):
                    # clone: per-expert parameters must not share storage, or saving drops them
                    set_parameter(getattr(expert, proj), "weight", tensor.clone())
        if self.has_shared_expert:
            self._check_shared(layer.shared, layer.shared_gate)
            for proj, tensor in zip(
                ("gate_proj", "up_proj", "down_proj"), layer.shared, strict=True
            ):
                shared = getattr(block, self.shared_expert_attr)
                set_parameter(getattr(shared, proj), "weight", tensor)
            if self.has_shared_gate:
                set_parameter(block.shared_expert_gate, "weight", layer.shared_gate)

    def _check_shared(self, shared: Any, shared_gate: Any) -> None:
        if shared is None or (self.has_shared_gate and shared_gate is None):
            gate = " and its gate" if self.has_shared_gate else ""
            raise ValueError(f"The {self.name} output needs a shared expert{gate}.")


def rope_legacy_fields(config: dict[str, Any]) -> dict[str, Any]:
    """config.json rope keys that transformers 4.x needs and 5.x writes differently.

    4.x ignores ``rope_parameters`` (falling back to its own default theta, 1e6 for Mixtral,
    which silently changes every position but the first).
    """
    extra: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        extra["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            extra["rope_scaling"] = scaling
    return extra


def set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by ``tensor`` after checking its shape."""
    _check_shape(module, name, tensor)
    setattr(module, name, nn.Parameter(tensor.contiguous()))


def set_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a registered buffer by ``tensor`` (it stays persistent) after checking its
    shape."""
    _check_shape(module, name, tensor)
    setattr(module, name, tensor.contiguous())


def _check_shape(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    current = getattr(module, name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"Internal shape mismatch for {type(module).__name__}.{name}: model expects "
            f"{tuple(current.shape)}, built {tuple(tensor.shape)}."
        )
