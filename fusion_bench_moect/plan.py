"""The expert plan: which FFN each expert comes from, anchors, alphas. Pure logic, no I/O."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .arch import OutputArchitecture, check_supported
from .ops.layers import dense_layers, resolve_moe_layers
from .ops.schedules import alpha_schedule
from .params import MoECTConfig

log = logging.getLogger(__name__)

BASE_EXPERT = "_pretrained_"


@dataclass(frozen=True)
class ExpertGroup:
    """One complete FFN, split into G fine-grained experts.

    Attributes:
        name: ``_pretrained_`` for the base expert, the pool name of a source, or
            ``expert_{r}`` for the r-th copy in pure upcycling.
        source: Pool name to fuse with the base FFN, or None for a copy of the base FFN.
        noise_scale: Std of Gaussian noise added to this group's weights.
        residual_scale: Factor on this group's down projection.
    """

    name: str
    source: str | None
    noise_scale: float = 0.0
    residual_scale: float = 1.0


@dataclass(frozen=True)
class SharedFFN:
    """One FFN of the shared expert.

    Attributes:
        name: ``_pretrained_`` or the pool name of a source.
        source: Pool name to fuse with the base FFN (as its routed expert is), or None for
            the base FFN.
        residual_scale: Factor on this FFN's down projection (mergekit-moe's).
    """

    name: str
    source: str | None
    residual_scale: float = 1.0


#: The shared expert of today (and the default): the base FFN alone.
BASE_SHARED = (SharedFFN(BASE_EXPERT, None),)


@dataclass
class MoEPlan:
    """Everything the builder needs besides the tensors themselves."""

    architecture: str
    groups: list[ExpertGroup]
    granularity: int
    experts_per_token: int
    alphas: list[float]
    anchor_groups: list[int]
    router_aux_scale: float
    gate_mode: str
    gate_scale: float
    drop_ratio: float
    shared_expert_share: float
    permute_neurons: bool
    seed: int
    #: Group-limited routing: expert groups per layer and how many a token's experts use.
    n_group: int = 1
    topk_group: int = 1
    #: Decoder layers that become MoE (sorted); the others keep the base FFN, dense.
    moe_layers: list[int] = field(default_factory=list)
    #: The FFNs concatenated into the shared expert (none for a family without one).
    shared_ffns: tuple[SharedFFN, ...] = BASE_SHARED

    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    @property
    def dense_layers(self) -> list[int]:
        """Layers that stay dense (transformers' ``mlp_only_layers``)."""
        return dense_layers(self.moe_layers, self.num_layers)

    @property
    def num_experts(self) -> int:
        return len(self.groups) * self.granularity

    @property
    def anchor_indices(self) -> list[int]:
        """Expert indices (all G slices) of the anchor groups."""
        g = self.granularity
        return [r * g + j for r in self.anchor_groups for j in range(g)]

    @property
    def expert_names(self) -> list[str]:
        if self.granularity == 1:
            return [grp.name for grp in self.groups]
        return [f"{grp.name}/{j}" for grp in self.groups for j in range(self.granularity)]

    def describe(self, dtype: Any) -> str:
        """One log line: output family, experts, top-k, dtype, gate mode (and the dense layers
        and a shared expert of several FFNs, when there are)."""
        line = (
            f"output {self.architecture}, {self.num_experts} experts ({len(self.groups)} groups x "
            f"granularity {self.granularity}), top-{self.experts_per_token}, dtype "
            f"{str(dtype).replace('torch.', '')}, gate_mode {self.gate_mode}"
        )
        if self.dense_layers:
            line += (
                f", MoE in {len(self.moe_layers)} of {self.num_layers} layers "
                f"({', '.join(map(str, self.moe_layers))})"
            )
        if self.shared_ffns not in ((), BASE_SHARED):
            line += f", shared expert = {' + '.join(f.name for f in self.shared_ffns)}"
        return line

    def record(self, params: Mapping[str, Any], condition_numbers: Sequence[float]) -> dict:
        """The JSON-able record stored as ``config.moe_ct`` in the output model."""
        return {
            "version": 1,
            "architecture": self.architecture,
            "experts": self.expert_names,
            "expert_sources": [grp.source or BASE_EXPERT for grp in self.groups],
            "anchor_experts": self.anchor_indices,
            "granularity": self.granularity,
            "alphas": [float(a) for a in self.alphas],
            "router_condition_numbers": [float(c) for c in condition_numbers],
            "moe_layers": list(self.moe_layers),
            "shared_experts": [
                {
                    "name": f.name,
                    "source": f.source or BASE_EXPERT,
                    "residual_scale": f.residual_scale,
                }
                for f in self.shared_ffns
            ],
            "params": dict(params),
        }


def per_expert_value(value: float | Mapping[str, float] | None, name: str, default: float) -> float:
    """Resolve a scalar-or-mapping parameter for one expert group."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        return float(value.get(name, default))
    return float(value)


def make_plan(
    config: MoECTConfig,
    *,
    family: OutputArchitecture,
    source_names: Sequence[str],
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
) -> MoEPlan:
    """Check the parameters against the base model's shape and the output family, and lay out
    the experts.

    Args:
        config: The build parameters (already checked field by field).
        family: The output architecture.
        source_names: The pool's source experts, in expert order.
        num_layers, hidden_size, intermediate_size: The dense base's shape.

    Raises:
        ValueError: For every inconsistent parameter, naming it and the fix.
    """
    g = config.granularity
    if intermediate_size % g:
        raise ValueError(
            f"The base FFN intermediate size {intermediate_size} is not divisible by granularity "
            f"{g}; choose a divisor of {intermediate_size}."
        )
    alphas = alpha_schedule(config.alpha_strategy, config.base_alpha, num_layers)
    if not config.moe_ct_mode:
        alphas = [1.0] * num_layers
    chosen_layers = resolve_moe_layers(config.moe_layers, alphas)
    check_supported(family, config, chosen_layers, num_layers)
    shared_ffns = parse_shared_experts(
        config.shared_experts, source_names, family.has_shared_expert
    )
    groups = _groups(config, source_names)
    _check_routing(config, family, len(groups), hidden_size)
    anchor_groups = _anchor_groups(config, [grp.name for grp in groups])
    return MoEPlan(
        architecture=family.name,
        groups=groups,
        granularity=g,
        experts_per_token=config.experts_per_token,
        alphas=alphas,
        anchor_groups=anchor_groups,
        router_aux_scale=config.anchor_router_scale(bool(anchor_groups)),
        gate_mode=config.gate_mode,
        gate_scale=config.gate_scale,
        drop_ratio=config.drop_ratio,
        shared_expert_share=config.shared_expert_share,
        permute_neurons=config.permute_neurons,
        seed=config.seed,
        n_group=config.n_group,
        topk_group=config.topk_group,
        moe_layers=chosen_layers,
        shared_ffns=shared_ffns,
    )


def parse_shared_experts(
    entries: Sequence[str | Mapping[str, Any]] | None,
    source_names: Sequence[str],
    has_shared: bool,
) -> tuple[SharedFFN, ...]:
    """The FFNs of the shared expert from ``shared_experts``.

    Each entry is a pool name (``_pretrained_`` for the base) or a mapping
    ``{source: name, residual_scale: r}``; None means the base alone. An output without a
    shared expert gets no FFN (``check_supported`` has refused ``shared_experts`` for it).

    Raises:
        ValueError: For an unknown or repeated name, or a malformed entry.
    """
    if not has_shared:
        return ()
    if entries is None:
        return BASE_SHARED
    if isinstance(entries, (str, Mapping)):
        entries = [entries]
    valid = [BASE_EXPERT, *source_names]
    ffns: list[SharedFFN] = []
    for entry in entries:
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"source", "residual_scale"}
            if "source" not in entry or unknown:
                raise ValueError(
                    f"shared_experts entry {dict(entry)!r}: give a pool name or "
                    "{source: <pool name>, residual_scale: <number>}."
                )
            name, scale = entry["source"], float(entry.get("residual_scale", 1.0))
        else:
            name, scale = entry, 1.0
        if name not in valid:
            raise ValueError(
                f"shared_experts names {name!r}, which is not in the model pool; valid: "
                f"{', '.join(valid)}."
            )
        if any(f.name == name for f in ffns):
            raise ValueError(f"shared_experts lists {name!r} twice.")
        if not math.isfinite(scale):
            raise ValueError(f"shared_experts: residual_scale of {name!r} must be finite.")
        ffns.append(SharedFFN(name, None if name == BASE_EXPERT else name, scale))
    if not ffns:
        raise ValueError(
            "shared_experts is empty; list at least one pool name (default: _pretrained_)."
        )
    return tuple(ffns)


def _groups(config: MoECTConfig, source_names: Sequence[str]) -> list[ExpertGroup]:
    """The expert groups, in order, with their noise and residual scales."""
    return [
        ExpertGroup(
            name=name,
            source=None if name == BASE_EXPERT or not source_names else name,
            noise_scale=per_expert_value(config.noise_scale, name, 0.0),
            residual_scale=per_expert_value(config.residual_scale, name, 1.0),
        )
        for name in _group_names(config, source_names)
    ]


def _group_names(config: MoECTConfig, source_names: Sequence[str]) -> list[str]:
    """One name per expert group: (base +) sources when merging, ``expert_r`` copies else."""
    g, num_experts = config.granularity, config.num_experts
    if source_names:
        names = ([BASE_EXPERT] if config.include_base_expert else []) + list(source_names)
        derived = len(names) * g
        if num_experts is not None and num_experts != derived:
            raise ValueError(
                f"num_experts={num_experts} but the pool gives {len(source_names)} source "
                f"experts{' + the base expert' if config.include_base_expert else ''} x "
                f"granularity {g} = {derived}; drop num_experts (it is derived when merging)."
            )
        return names
    total = 8 if num_experts is None else num_experts
    if total % g:
        raise ValueError(
            f"num_experts={total} is not a multiple of granularity {g}; each group of G "
            "experts holds one complete FFN."
        )
    return [f"expert_{r}" for r in range(total // g)]


def _check_routing(
    config: MoECTConfig, family: OutputArchitecture, num_groups: int, hidden_size: int
) -> None:
    """Top-k within the expert count; enough dimensions for orthogonal router rows."""
    g, k = config.granularity, config.experts_per_token
    num = num_groups * g
    if not 1 <= k <= num:
        raise ValueError(f"experts_per_token={k} must lie in [1, num_experts={num}].")
    problem = family.routing_reason(num, config)
    if problem is not None:
        raise ValueError(problem)
    if k % g:
        log.warning(
            "experts_per_token=%d is not a multiple of granularity %d: the MoE no longer "
            "reproduces the dense model exactly.",
            k,
            g,
        )
    if config.gate_mode == "orthogonal" and num_groups > hidden_size:
        raise ValueError(
            f"gate_mode 'orthogonal' needs at most hidden_size={hidden_size} distinct router rows "
            f"but the plan has {num_groups} expert groups (num_experts={num}, granularity="
            f"{g}); use fewer experts, a larger granularity, or gate_mode 'random'."
        )


def _anchor_groups(config: MoECTConfig, group_names: list[str]) -> list[int]:
    """The anchor groups: those named in ``anchor_experts``, else the base expert's."""
    if config.anchor_experts:
        unknown = [a for a in config.anchor_experts if a not in group_names]
        if unknown:
            raise ValueError(
                f"anchor_experts names {unknown} that are not experts; experts: {group_names}."
            )
        anchors = [group_names.index(a) for a in config.anchor_experts]
    elif BASE_EXPERT in group_names:
        anchors = [group_names.index(BASE_EXPERT)]
    else:
        anchors = []
    if config.router_aux_scale not in (None, 1.0) and not anchors:
        log.warning(
            "router_aux_scale=%s has no effect: there is no anchor expert (set "
            "include_base_expert with source experts, or name anchor_experts). Routers are "
            "left unscaled.",
            config.router_aux_scale,
        )
    return anchors
