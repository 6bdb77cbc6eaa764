"""The engine: compute the MoE model from dense sources one tensor at a time.

``MoEEngine`` carries what every step needs (plan, output architecture, the opened base and
sources, router rows, dtype). ``MoEEngine.tensors`` yields the output in order: every
non-FFN tensor, then one ``MoELayer`` per decoder layer whose expert groups are computed
lazily, one FFN at a time. Two sinks consume it:

- ``MoEEngine.build_model``: the model in memory. It is created on the meta device and every
  parameter is computed, cast once, and installed in place (no second copy).
- ``MoEEngine.stream``: a Hugging Face checkpoint written shard by shard
  (``io/streaming.py``) without ever holding the model; its peak memory does not grow with
  the number of experts.

Pure copies of the base FFN (upcycling) are computed once per layer and shared by every
expert that is such a copy, with no float32 round trip when nothing is scaled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from .arch import OutputArchitecture, auto_architecture
from .arch.base import ExpertSlices, MoELayer, set_parameter
from .inspection import is_moe_param
from .io import streaming
from .io.mapped import fused_units
from .io.sources import SourceError, TensorSource
from .ops.fusion import add_noise, drop_neurons, lerp_fuse
from .ops.routers import (
    condition_number,
    expand_groups,
    random_rows,
    scale_anchor_rows,
    seeded_generator,
)
from .ops.shared import concat_ffns, shared_expert_scales
from .plan import MoEPlan
from .progress import progress

if TYPE_CHECKING:
    from .non_expert import NonExpertMerge

log = logging.getLogger(__name__)

FFN_PROJ = ("gate_proj", "up_proj", "down_proj")
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Random streams: a feature's numbers never depend on whether another feature is on.
STREAM_ROUTER, STREAM_NOISE, STREAM_DROP, STREAM_PERMUTE = 1, 2, 3, 4


#: Dtypes whose values float32 holds exactly (a copy through float32 changes nothing).
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)
#: Environment variable overriding the engine's torch threads (default 1).
THREADS_ENV = "FUSION_BENCH_MOECT_THREADS"


def ffn_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_ffn_key(key: str) -> bool:
    return ".mlp." in key


def prompt_free_router_rows(plan: MoEPlan, num_layers: int, hidden_size: int) -> list[torch.Tensor]:
    """Per layer, the float32 (num_groups, H) router rows of a prompt-free ``gate_mode``
    (``orthogonal``, ``random``, ``uniform_random``), each layer from its own seeded stream."""
    return [
        random_rows(
            plan.gate_mode,
            len(plan.groups),
            hidden_size,
            seeded_generator(plan.seed, STREAM_ROUTER, layer),
        )
        for layer in range(num_layers)
    ]


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


@contextmanager
def engine_threads(num_threads: int | None = None) -> Iterator[None]:
    """Run torch with ``num_threads`` intra-op threads (default: ``$FUSION_BENCH_MOECT_THREADS``
    or 1), restoring the previous setting afterwards.

    The engine only copies, casts and adds tensors: memory-bound work that more threads do not
    speed up, while their synchronisation costs up to 50x per operation on a machine whose
    cores are busy with other processes (measured: a 1536 x 576 bf16 sum takes 0.06 ms on one
    thread, 8 ms on two threads of a shared 2-core machine).
    """
    wanted = num_threads if num_threads is not None else int(os.environ.get(THREADS_ENV, "1"))
    previous = torch.get_num_threads()
    if wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class NonFFNTensor:
    """One non-FFN output tensor: copied from the base (``source`` = its base key) or zeros."""

    name: str
    shape: tuple[int, ...]
    source: str | None


def plan_non_ffn(
    arch: OutputArchitecture, base: TensorSource, output_names: Sequence[str]
) -> list[NonFFNTensor]:
    """Which non-FFN tensors the output gets and where each comes from, checked up front.

    Args:
        arch: The output architecture.
        base: The dense base model.
        output_names: The output's non-FFN tensor names (a tied ``lm_head`` excluded).

    Raises:
        ValueError: If the output cannot represent a base tensor, or the base provides no
            value for an output tensor.
    """
    cfg = base.config
    wanted = set(output_names)
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    planned: list[NonFFNTensor] = []
    for key in base.keys():
        if is_ffn_key(key):
            continue
        if key not in wanted:
            if key == "lm_head.weight" and tie:
                continue
            tensor = base.get(key)
            if tensor.is_floating_point() and not bool(tensor.any()):
                log.info("Dropping all-zero base tensor %s (no slot in %s).", key, arch.name)
                continue
            raise ValueError(
                f"The {arch.name} output cannot represent base tensor '{key}' of the "
                f"{cfg.model_type} base; use architecture: "
                f"{auto_architecture(cfg.model_type)} (what auto picks for {cfg.model_type})."
            )
        planned.append(NonFFNTensor(key, tuple(base.shape(key)), key))
    provided = {t.name for t in planned}
    missing = []
    for name in output_names:
        if name in provided:
            continue
        weight = name[: -len("bias")] + "weight"
        if name == LM_HEAD and tie and EMBEDDING in provided:
            # An output that cannot tie (for llama.cpp) gets the embedding as lm_head.
            planned.append(NonFFNTensor(name, tuple(base.shape(EMBEDDING)), EMBEDDING))
        elif name.endswith(arch.zero_fill_suffixes) and weight in provided:
            planned.append(NonFFNTensor(name, (base.shape(weight)[0],), None))
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"The base model provides no value for {len(missing)} parameter(s) of the "
            f"{arch.name} output, e.g. '{missing[0]}'."
        )
    return planned


@dataclass
class MoEEngine:
    """Everything the engine's steps need: what to build, from what, in which dtype.

    Attributes:
        plan: The validated expert plan.
        arch: The output architecture.
        base: The dense base model B.
        sources: Source experts by pool name.
        router_rows: Per layer, float32 (num_groups, H) router rows before ``gate_scale``,
            granularity expansion and anchor scaling.
        dtype: The output dtype.
        shared_gate_rows: Per layer, a (1, H) shared-expert gate weight from prompts (families
            whose shared expert has a gate); default ``arch.shared_gate_init``.
        non_expert: The FusionBench merge of the non-FFN tensors it covers (default: every
            non-FFN tensor is the base's).
    """

    plan: MoEPlan
    arch: OutputArchitecture
    base: TensorSource
    sources: Mapping[str, TensorSource]
    router_rows: Sequence[torch.Tensor]
    dtype: torch.dtype
    shared_gate_rows: Sequence[torch.Tensor] | None = None
    non_expert: NonExpertMerge | None = None

    @property
    def expert_size(self) -> int:
        return self.base.config.intermediate_size // self.plan.granularity

    def output_config(self, base_config: Any = None) -> Any:
        """The transformers config of the MoE model (from ``base_config``, default the base's)."""
        config = base_config if base_config is not None else self.base.config
        return output_config(self.plan, self.arch, config, self.dtype)

    # -- the tensors ----------------------------------------------------------------------

    def tensors(
        self, non_ffn: Sequence[NonFFNTensor]
    ) -> Iterator[tuple[str, torch.Tensor] | MoELayer]:
        """Every output tensor, in order, computed on demand.

        Yields ``(name, tensor)`` for each entry of ``non_ffn`` (see ``plan_non_ffn``), then
        one ``MoELayer`` per decoder layer. Consume each layer's ``groups`` before asking for
        the next item.
        """
        tied_base = bool(getattr(self.base.config, "tie_word_embeddings", False))
        for item in progress(non_ffn, desc="Copying attention/embeddings", leave=False):
            if item.source is None:
                yield item.name, torch.zeros(item.shape, dtype=self.dtype)
            elif self.non_expert is not None and self.non_expert.covers(item.source):
                yield item.name, self.non_expert.merged(item.source, self.dtype)
            elif item.name == LM_HEAD and tied_base:
                # Untied from the embedding: its own memory, or training would update both.
                yield item.name, self.base.get(item.source).to(self.dtype, copy=True)
            else:
                yield item.name, self.base.get(item.source).to(self.dtype)
        cfg, plan = self.base.config, self.plan
        permutation = None
        if plan.permute_neurons:
            permutation = torch.randperm(
                cfg.intermediate_size, generator=seeded_generator(plan.seed, STREAM_PERMUTE)
            )
        moe_layers = set(plan.moe_layers)
        for layer in progress(
            range(cfg.num_hidden_layers), desc=f"Building {self.arch.name} MoE layers"
        ):
            if layer not in moe_layers:  # a dense layer keeps the base FFN
                for proj in FFN_PROJ:
                    yield ffn_key(layer, proj), self.base.get(ffn_key(layer, proj)).to(self.dtype)
                continue
            yield self.layer(layer, permutation)

    def layer(self, layer: int, permutation: torch.Tensor | None) -> MoELayer:
        """One MoE layer: routers and the shared expert (if any) now, experts lazily."""
        plan, dtype = self.plan, self.dtype
        base_ffn = [self.base.get(ffn_key(layer, p)) for p in FFN_PROJ]
        hidden = base_ffn[0].shape[1]
        router = expand_groups(self.router_rows[layer] * plan.gate_scale, plan.granularity)
        router = scale_anchor_rows(router, plan.anchor_indices, plan.router_aux_scale).to(dtype)
        shared = shared_gate = None
        if self.arch.has_shared_expert:
            shared = self._shared_expert(layer, base_ffn)
        if self.arch.has_shared_gate:
            # The initial gate's value is what ``arch.shared_gate_factor`` compensates.
            if self.shared_gate_rows is None:
                shared_gate = self.arch.shared_gate_init(hidden, dtype)
            else:
                shared_gate = self.shared_gate_rows[layer].reshape(1, hidden).to(dtype)
        return MoELayer(
            index=layer,
            router=router,
            groups=self._expert_groups(layer, base_ffn, permutation),
            expert_size=self.expert_size,
            shared=shared,
            shared_gate=shared_gate,
            router_bias=self.arch.initial_router_bias(plan.num_experts),
        )

    def _shared_expert(
        self, layer: int, base_ffn: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared expert: the FFNs of ``plan.shared_ffns`` side by side (width n x I), each
        fused with the base as its routed expert is, each down projection scaled to its share."""
        plan = self.plan
        alpha = plan.alphas[layer]
        ffns = [
            base_ffn
            if f.source is None
            else [
                lerp_fuse(w, self.sources[f.source].get(ffn_key(layer, p)), alpha)
                for w, p in zip(base_ffn, FFN_PROJ, strict=True)
            ]
            for f in plan.shared_ffns
        ]
        scales = shared_expert_scales(
            plan.shared_expert_share,
            [f.residual_scale for f in plan.shared_ffns],
            self.arch.shared_gate_factor,
        )
        return concat_ffns(ffns, scales, self.dtype)

    def _expert_groups(
        self, layer: int, base_ffn: list[torch.Tensor], permutation: torch.Tensor | None
    ) -> Iterator[ExpertSlices]:
        plan = self.plan
        # Each slice of a G-way split gets 1/G of the routing weight, so its output is scaled by G.
        routed_scale = float(plan.granularity)
        if self.arch.has_shared_expert:
            routed_scale *= 1.0 - plan.shared_expert_share
        exact = all(w.dtype in _EXACT_IN_FLOAT32 for w in base_ffn)
        copies: dict[float, ExpertSlices] = {}
        for r, group in enumerate(plan.groups):
            scale = routed_scale * group.residual_scale
            dropped = plan.drop_ratio > 0 and r not in plan.anchor_groups  # anchors keep the base
            if group.source is None and not group.noise_scale and not dropped and exact:
                # A plain copy of the base FFN: the same for every such group of this layer.
                if scale not in copies:
                    copies[scale] = _copied_group(
                        base_ffn, plan.granularity, scale, self.dtype, permutation
                    )
                yield copies[scale]
            else:
                full = self._fused_ffn(layer, r, base_ffn)
                yield self._sliced_group(layer, r, full, scale, dropped, permutation)

    def _fused_ffn(self, layer: int, r: int, base_ffn: list[torch.Tensor]) -> list[torch.Tensor]:
        """Group ``r``'s full FFN in float32: the base copy or lerp(base, source, alpha_l),
        plus its noise."""
        plan, group = self.plan, self.plan.groups[r]
        if group.source is None:
            full = [w.to(torch.float32, copy=True) for w in base_ffn]
        else:
            src = self.sources[group.source]
            full = [
                lerp_fuse(w, src.get(ffn_key(layer, p)), plan.alphas[layer])
                for w, p in zip(base_ffn, FFN_PROJ, strict=True)
            ]
        if group.noise_scale:
            noise_gen = seeded_generator(plan.seed, STREAM_NOISE, layer, r)
            for tensor in full:
                add_noise(tensor, group.noise_scale, noise_gen)
        return full

    def _sliced_group(
        self,
        layer: int,
        r: int,
        full: list[torch.Tensor],
        scale: float,
        dropped: bool,
        permutation: torch.Tensor | None,
    ) -> ExpertSlices:
        """A full float32 FFN as G expert slices: permuted, down scaled, neurons dropped, cast."""
        g = self.plan.granularity
        f_gate, f_up, f_down = full
        intermediate, hidden = f_gate.shape
        size = intermediate // g
        if permutation is not None:
            f_gate, f_up, f_down = f_gate[permutation], f_up[permutation], f_down[:, permutation]
        # (I, H) -> (G, I/G, H) and (H, I) -> (G, H, I/G): disjoint contiguous neuron slices.
        s_gate = f_gate.reshape(g, size, hidden)
        s_up = f_up.reshape(g, size, hidden)
        s_down = f_down.reshape(hidden, g, size).permute(1, 0, 2) * scale
        if dropped:
            for j in range(g):
                drop_gen = seeded_generator(self.plan.seed, STREAM_DROP, layer, r * g + j)
                drop_neurons(s_gate[j], s_up[j], s_down[j], self.plan.drop_ratio, drop_gen)
        return s_gate.to(self.dtype), s_up.to(self.dtype), s_down.to(self.dtype).contiguous()

    # -- sink 1: the model in memory -------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        """Create the MoE causal LM in memory (eval mode, on CPU)."""
        from accelerate import init_empty_weights  # ~0.2 s that streamed builds do not need

        config = self.output_config()
        with init_empty_weights(include_buffers=False):
            model = self.arch.model_class()(config)
        tie = bool(getattr(config, "tie_word_embeddings", False))
        output_names = [
            name
            for name, _ in model.named_parameters()
            if not is_moe_param(name) and not (tie and name == "lm_head.weight")
        ]
        non_ffn = plan_non_ffn(self.arch, self.base, output_names)
        with engine_threads():
            for item in self.tensors(non_ffn):
                if isinstance(item, MoELayer):
                    self.arch.install(model.model.layers[item.index], item)
                else:
                    _install(model, *item)
        if tie:
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(
                f"The base model provides no value for {len(missing)} parameter(s) of the "
                f"{self.arch.name} output, e.g. '{missing[0]}'."
            )
        model.eval()
        return model

    # -- sink 2: a checkpoint streamed to disk ---------------------------------------------

    def stream(
        self,
        directory: str | os.PathLike,
        *,
        params: Mapping[str, Any],
        tokenizer: Any = None,
        tokenizer_dir: str | os.PathLike | None = None,
        base_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        max_shard_bytes: int | None = None,
        config: Any = None,
        fused_order: bool = False,
        card: Any = None,
    ) -> list[float]:
        """Write the MoE model as a Hugging Face checkpoint without building it in memory.

        Tensors go to disk as they are computed, shard by shard; peak memory is about one FFN
        of the base per layer plus the base's non-FFN tensors, whatever the number of experts.

        Args:
            directory: The checkpoint directory (written atomically).
            params: The algorithm parameters, recorded in ``config.json`` under ``moe_ct``.
            tokenizer: A tokenizer to save with the model.
            tokenizer_dir: Or a directory whose tokenizer files are copied.
            base_dir: The base's directory; its ``generation_config.json`` is copied if present.
            overwrite: Replace a non-empty ``directory``.
            max_shard_bytes: Largest shard (default as ``save_checkpoint``: 2 GB).
            config: The output's transformers config, or a function returning it, called after
                the tensors are written (so that loading transformers' config classes can
                overlap with the work); default ``output_config()``. ``base.config`` may then
                be a plain ``JsonConfig``: the tensor names derived from it are checked against
                this config before anything is moved into place.
            fused_order: Lay each layer's experts out in transformers 5's fused order (see
                ``arch.hub_layer_tensors``), each fused tensor within one shard
                (``io.mapped.fused_units``), so that ``io.mapped`` can map the checkpoint
                back as a model without copies. The experts are still computed and written
                one at a time.
            card: Returns the model card given the final config (``write_hub_checkpoint``).

        Returns:
            The router condition number of every layer (also in the record).
        """
        names = self.arch.non_ffn_names(self._structure())
        non_ffn = plan_non_ffn(self.arch, self.base, names)
        specs = self.hub_specs(non_ffn, fused_order)
        conds: list[float] = []
        with engine_threads():
            streaming.write_hub_checkpoint(
                directory,
                specs,
                self._hub_tensors(non_ffn, conds),
                lambda: self._final_config(config, names, params, conds),
                tokenizer=tokenizer,
                tokenizer_dir=tokenizer_dir,
                generation_config_from=base_dir,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes or streaming.DEFAULT_MAX_SHARD_BYTES,
                units=fused_units(specs, self.arch.expert_proj_names) if fused_order else None,
                card=card,
            )
        return conds

    def hub_specs(
        self, non_ffn: Sequence[NonFFNTensor], fused_order: bool = False
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every tensor ``stream`` writes, in the same order.

        The MoE part is produced by the same ``arch.hub_layer_tensors`` on meta tensors, so the
        names and order cannot drift from what is written.
        """
        cfg, plan, dtype = self.base.config, self.plan, self.dtype
        hidden, intermediate, size = cfg.hidden_size, cfg.intermediate_size, self.expert_size

        def meta(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device="meta")

        specs = [(t.name, t.shape, dtype) for t in non_ffn]
        expert = (meta(size, hidden), meta(size, hidden), meta(hidden, size))
        shared = shared_gate = None
        if self.arch.has_shared_expert:
            width = intermediate * len(plan.shared_ffns)
            shared = (meta(width, hidden), meta(width, hidden), meta(hidden, width))
        if self.arch.has_shared_gate:
            shared_gate = meta(1, hidden)
        moe_layers = set(plan.moe_layers)
        for layer in range(cfg.num_hidden_layers):
            if layer not in moe_layers:
                specs += [
                    (ffn_key(layer, p), tuple(self.base.shape(ffn_key(layer, p))), dtype)
                    for p in FFN_PROJ
                ]
                continue
            layer_tensors = self.arch.hub_layer_tensors(
                layer,
                meta(plan.num_experts, hidden),
                [expert] * plan.num_experts,
                shared,
                shared_gate,
                fused_order,
                router_bias=self.arch.initial_router_bias(plan.num_experts),
            )
            specs += [(name, tuple(t.shape), t.dtype) for name, t in layer_tensors]
        return specs

    def _hub_tensors(
        self, non_ffn: Sequence[NonFFNTensor], conds: list[float]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The output as (hub name, tensor) pairs, experts one by one (each expert's
        projections together, whatever the file order: the writer places every tensor);
        appends every layer's router condition number to ``conds`` on the way."""
        for item in self.tensors(non_ffn):
            if isinstance(item, MoELayer):
                conds.append(condition_number(item.router[:: self.plan.granularity]))
                yield from self.arch.hub_layer_tensors(
                    item.index,
                    item.router,
                    item.experts(),
                    item.shared,
                    item.shared_gate,
                    router_bias=item.router_bias,
                )
            else:
                yield item

    def _structure(self) -> Any:
        """What the tensor names of the output depend on (layers, tying, attention biases),
        from the base config alone: a stand-in for the output config that needs no
        transformers config class."""
        plan, base_config = self.plan, self.base.config
        moe = self.arch.moe_config(
            base_config, plan.num_experts, plan.experts_per_token, self.expert_size
        )
        extra = self.arch.plan_config(plan, base_config)
        return SimpleNamespace(**{**base_config.to_dict(), **moe, **extra})

    def _final_config(
        self, config: Any, names: list[str], params: Mapping[str, Any], conds: list[float]
    ) -> Any:
        """The output config once the tensors are written, checked and given the record."""
        final = config() if callable(config) else config
        if final is None:
            final = self.output_config()
        if self.arch.non_ffn_names(final) != names:
            raise RuntimeError(
                "Internal error: the config's tensor names differ from those written "
                f"({sorted(set(self.arch.non_ffn_names(final)) ^ set(names))[:3]})."
            )
        final.moe_ct = self.record(params, conds)
        return final

    def record(self, params: Mapping[str, Any], condition_numbers: Sequence[float]) -> dict:
        """``config.moe_ct``: the plan's record, and what the non-expert merge merged."""
        record = self.plan.record(params, condition_numbers)
        if self.non_expert is not None:
            record["non_expert"] = self.non_expert.record()
        return record


def output_config(
    plan: MoEPlan, arch: OutputArchitecture, base_config: Any, dtype: torch.dtype
) -> Any:
    """The transformers config of the MoE model (no model is built) for the base's config."""
    expert_size = base_config.intermediate_size // plan.granularity
    return arch.build_config(
        base_config,
        plan.num_experts,
        plan.experts_per_token,
        expert_size,
        dtype,
        extra=arch.plan_config(plan, base_config),
    )


def _copied_group(
    base_ffn: list[torch.Tensor],
    g: int,
    scale: float,
    dtype: torch.dtype,
    permutation: torch.Tensor | None,
) -> ExpertSlices:
    """The base FFN as G expert slices, cast once; bit-identical to the float32 path (values
    of these dtypes pass through float32 unchanged), without a float32 copy when unscaled."""
    f_gate, f_up, f_down = base_ffn
    intermediate, hidden = f_gate.shape
    size = intermediate // g
    if permutation is not None:
        f_gate, f_up, f_down = f_gate[permutation], f_up[permutation], f_down[:, permutation]
    s_down = f_down.reshape(hidden, g, size).permute(1, 0, 2)
    if scale != 1.0:
        s_down = s_down.to(torch.float32) * scale
    return (
        f_gate.reshape(g, size, hidden).to(dtype),
        f_up.reshape(g, size, hidden).to(dtype),
        s_down.to(dtype).contiguous(),
    )


def _install(model: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = dotted.rpartition(".")
    set_parameter(model.get_submodule(module_path), attr, tensor)
