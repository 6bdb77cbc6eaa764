"""The engine: build the MoE model from dense sources one tensor at a time.

Nothing here holds a second copy of the output model: the MoE is created on the meta
device and every parameter is computed, cast once, and installed in place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .arch import MoELayerWeights, OutputArchitecture
from .arch.base import set_parameter
from .io.sources import SourceError, TensorSource
from .ops.fusion import add_noise, drop_neurons, lerp_fuse
from .ops.routers import expand_groups, scale_anchor_rows, seeded_generator
from .plan import MoEPlan

log = logging.getLogger(__name__)

FFN_PROJ = ("gate_proj", "up_proj", "down_proj")
# Random streams: a feature's numbers never depend on whether another feature is on.
STREAM_ROUTER, STREAM_NOISE, STREAM_DROP, STREAM_PERMUTE = 1, 2, 3, 4


def ffn_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_ffn_key(key: str) -> bool:
    return ".mlp." in key


def check_compatible(base: TensorSource, source: TensorSource) -> None:
    """Raise SourceError unless ``source`` has exactly the base's architecture and shapes."""
    if source.config.model_type != base.config.model_type:
        raise SourceError(
            f"Source '{source.name}' is a {source.config.model_type} model but the base is "
            f"{base.config.model_type}; every source must be a fine-tune of the base."
        )
    if source.config.num_hidden_layers != base.config.num_hidden_layers:
        raise SourceError(
            f"Source '{source.name}' has {source.config.num_hidden_layers} layers, the base has "
            f"{base.config.num_hidden_layers}."
        )
    base_keys, src_keys = set(base.keys()), set(source.keys())
    tied = {"lm_head.weight"}  # present or absent depending on how tied weights were saved
    for key in sorted((base_keys ^ src_keys) - tied):
        where = "missing from" if key in base_keys else "not in the base but in"
        raise SourceError(f"Tensor '{key}' is {where} source '{source.name}'.")
    for key in sorted(base_keys & src_keys):
        if base.shape(key) != source.shape(key):
            raise SourceError(
                f"Source '{source.name}': tensor '{key}' has shape {list(source.shape(key))}, "
                f"the base has {list(base.shape(key))}."
            )


def build_moe_model(
    plan: MoEPlan,
    arch: OutputArchitecture,
    base: TensorSource,
    sources: Mapping[str, TensorSource],
    group_router_rows: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> torch.nn.Module:
    """Create the MoE causal LM.

    Args:
        plan: The validated expert plan.
        arch: The output architecture.
        base: The dense base model B.
        sources: Source experts by pool name.
        group_router_rows: Per layer, float32 (num_groups, H) router rows before gate_scale,
            granularity expansion and anchor scaling.
        dtype: Output dtype.

    Returns:
        The MoE model (eval mode, on CPU).
    """
    from accelerate import init_empty_weights

    cfg = base.config
    num_layers, intermediate = cfg.num_hidden_layers, cfg.intermediate_size
    expert_size = intermediate // plan.granularity
    config = arch.build_config(cfg, plan.num_experts, plan.experts_per_token, expert_size, dtype)
    with init_empty_weights(include_buffers=False):
        model = arch.model_class()(config)
    params = dict(model.named_parameters())
    tie = bool(getattr(config, "tie_word_embeddings", False))

    for key in tqdm(
        [k for k in base.keys() if not is_ffn_key(k)],
        desc="Copying attention/embeddings",
        leave=False,
    ):
        if key not in params:
            if key == "lm_head.weight" and tie:
                continue
            tensor = base.get(key)
            if tensor.is_floating_point() and not bool(tensor.any()):
                log.info("Dropping all-zero base tensor %s (no slot in %s).", key, arch.name)
                continue
            from .arch import AUTO_ARCHITECTURE

            raise ValueError(
                f"The {arch.name} output cannot represent base tensor '{key}' of the "
                f"{cfg.model_type} base; use architecture: "
                f"{AUTO_ARCHITECTURE.get(cfg.model_type, 'auto')} (what auto picks for "
                f"{cfg.model_type})."
            )
        _install(model, key, base.get(key).to(dtype))

    permutation = None
    if plan.permute_neurons:
        permutation = torch.randperm(
            intermediate, generator=seeded_generator(plan.seed, STREAM_PERMUTE)
        )
    for layer in tqdm(range(num_layers), desc=f"Building {arch.name} MoE layers"):
        weights = build_layer(
            plan, arch, base, sources, layer, group_router_rows[layer], dtype, permutation
        )
        arch.install(model.model.layers[layer], weights)

    for name, param in model.named_parameters():
        if param.device.type != "meta":
            continue
        if name.endswith(arch.zero_fill_suffixes):
            _install(model, name, torch.zeros(param.shape, dtype=dtype))
    if tie:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(
            f"The base model provides no value for {len(missing)} parameter(s) of the "
            f"{arch.name} output, e.g. '{missing[0]}'."
        )
    model.eval()
    return model


def build_layer(
    plan: MoEPlan,
    arch: OutputArchitecture,
    base: TensorSource,
    sources: Mapping[str, TensorSource],
    layer: int,
    group_rows: torch.Tensor,
    dtype: torch.dtype,
    permutation: torch.Tensor | None,
) -> MoELayerWeights:
    """One MoE layer: fused experts, routers and (for Qwen2-MoE) the shared expert."""
    g = plan.granularity
    base_ffn = [base.get(ffn_key(layer, p)) for p in FFN_PROJ]
    intermediate, hidden = base_ffn[0].shape
    size = intermediate // g
    num = plan.num_experts
    gate_up = torch.empty(num, 2 * size, hidden, dtype=dtype)
    down = torch.empty(num, hidden, size, dtype=dtype)
    # Each slice of a G-way split gets 1/G of the routing weight, so its output is scaled by G.
    routed_scale = float(g)
    if arch.has_shared_expert:
        routed_scale *= 1.0 - plan.shared_expert_share
    alpha = plan.alphas[layer]

    for r, group in enumerate(plan.groups):
        if group.source is None:
            full = [w.to(torch.float32, copy=True) for w in base_ffn]
        else:
            src = sources[group.source]
            full = [
                lerp_fuse(w, src.get(ffn_key(layer, p)), alpha)
                for w, p in zip(base_ffn, FFN_PROJ, strict=True)
            ]
        if group.noise_scale:
            noise_gen = seeded_generator(plan.seed, STREAM_NOISE, layer, r)
            for tensor in full:
                add_noise(tensor, group.noise_scale, noise_gen)
        f_gate, f_up, f_down = full
        if permutation is not None:
            f_gate, f_up, f_down = f_gate[permutation], f_up[permutation], f_down[:, permutation]
        # (I, H) -> (G, I/G, H) and (H, I) -> (G, H, I/G): disjoint contiguous neuron slices.
        s_gate = f_gate.reshape(g, size, hidden)
        s_up = f_up.reshape(g, size, hidden)
        s_down = f_down.reshape(hidden, g, size).permute(1, 0, 2)
        s_down = s_down * (routed_scale * group.residual_scale)
        if plan.drop_ratio > 0 and r not in plan.anchor_groups:  # anchors keep the base function
            for j in range(g):
                drop_gen = seeded_generator(plan.seed, STREAM_DROP, layer, r * g + j)
                drop_neurons(s_gate[j], s_up[j], s_down[j], plan.drop_ratio, drop_gen)
        lo, hi = r * g, (r + 1) * g
        gate_up[lo:hi, :size] = s_gate
        gate_up[lo:hi, size:] = s_up
        down[lo:hi] = s_down
        del full, f_gate, f_up, f_down, s_gate, s_up, s_down

    router = expand_groups(group_rows * plan.gate_scale, g)
    router = scale_anchor_rows(router, plan.anchor_indices, plan.router_aux_scale).to(dtype)
    shared = shared_gate = None
    if arch.has_shared_expert:
        share = 2.0 * plan.shared_expert_share  # sigmoid(0) = 1/2 at a zero shared gate
        shared = (
            base_ffn[0].to(dtype),
            base_ffn[1].to(dtype),
            (base_ffn[2].to(torch.float32) * share).to(dtype),
        )
        shared_gate = torch.zeros(1, hidden, dtype=dtype)
    return MoELayerWeights(
        router=router, gate_up=gate_up, down=down, shared=shared, shared_gate=shared_gate
    )


def _install(model: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = dotted.rpartition(".")
    set_parameter(model.get_submodule(module_path), attr, tensor)
