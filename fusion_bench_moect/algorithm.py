"""``OrthogonalMoECTMergingAlgorithm``: validation and orchestration only.

The math lives in ``ops/``, the per-family details in ``arch/``, the disk I/O in ``io/``
and the tensor-by-tensor engine in ``build.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fusion_bench import BaseModelPool, auto_register_config

from ._compat import ensure_fusion_bench_mixtral_importable
from ._config import to_plain

ensure_fusion_bench_mixtral_importable()
from fusion_bench.method import MixtralForCausalLMMergingAlgorithm  # noqa: E402

from . import arch as arch_registry  # noqa: E402
from .build import (  # noqa: E402
    build_moe_model,
    check_compatible,
    engine_threads,
    prompt_free_router_rows,
    stream_moe_checkpoint,
)
from .io.checkpoint import check_destination  # noqa: E402
from .io.sources import (  # noqa: E402
    SourceError,
    TensorSource,
    open_source,
    pool_model_path,
    resolve_dtype,
)
from .io.streaming import save_model_checkpoint  # noqa: E402
from .ops.routers import condition_number  # noqa: E402
from .params import PROMPT_GATE_MODES, MoECTConfig, init_signature  # noqa: E402
from .plan import MoEPlan, make_plan  # noqa: E402

log = logging.getLogger(__name__)


@auto_register_config
class OrthogonalMoECTMergingAlgorithm(MixtralForCausalLMMergingAlgorithm):
    """Upcycle a dense causal LM, or merge its fine-tunes, into a Mixture-of-Experts model.

    Pure upcycling (a pool with only ``_pretrained_``) makes ``num_experts`` copies of the
    base FFN; merging makes one expert per source model, fused with the base FFN by
    ``lerp(W_base, W_source, alpha_l)`` under a layer-wise alpha schedule (MoE-CT), plus the
    base FFN itself as an anchor expert. Routers start orthogonal by default.

    Every parameter, its default and its meaning: ``MoECTConfig`` in ``params.py`` (the
    signature below is generated from it) and docs/algorithm.md.
    """

    def __init__(self, **kwargs: Any):
        # ``auto_register_config`` has set every parameter as an attribute (from the generated
        # signature); FusionBench's base class still wants its three and warns on the rest.
        super().__init__(
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            save_checkpoint=self.save_checkpoint,
            **{k: v for k, v in kwargs.items() if k not in MoECTConfig.names()},
        )

    __init__.__signature__ = init_signature()

    @property
    def moect_config(self) -> MoECTConfig:
        """The current parameter values, checked (raises ValueError naming a bad one)."""
        return MoECTConfig(**{name: to_plain(getattr(self, name)) for name in MoECTConfig.names()})

    def parameters_record(self) -> dict[str, Any]:
        """Every algorithm parameter as plain JSON-able values."""
        return self.moect_config.record()

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | torch.nn.Module) -> torch.nn.Module | None:
        """Build the MoE model from the pool (and save it when ``save_checkpoint`` is set).

        Args:
            modelpool: A pool with ``_pretrained_`` (the dense base) and zero or more source
                experts of the same architecture; or a dense base model.

        Returns:
            The MoE causal LM (Mixtral, Qwen2-MoE or Qwen3-MoE), in eval mode; None with
            ``streaming: true`` (the model exists only on disk, at ``save_checkpoint``).
        """
        config = self.moect_config
        if isinstance(modelpool, torch.nn.Module):
            modelpool = BaseModelPool({"_pretrained_": modelpool})
        if not modelpool.has_pretrained:
            raise ValueError(
                "The model pool has no '_pretrained_' entry: add `_pretrained_: <path to the "
                "dense base model>` to its `models`."
            )
        streaming = bool(getattr(self, "streaming", False))
        if streaming and not self.save_checkpoint:
            raise ValueError(
                "streaming: true writes the model straight to disk and needs save_checkpoint: "
                "<directory>; set it, or set streaming: false to get the model in memory."
            )
        if self.save_checkpoint:
            check_destination(self.save_checkpoint, self.overwrite)
        source_names = list(modelpool.model_names)
        base = open_source(modelpool, "_pretrained_")
        sources: dict[str, TensorSource] = {}
        try:
            arch = arch_registry.resolve(self.architecture, base.config.model_type)
            for name in source_names:
                sources[name] = open_source(modelpool, name, base=base)
                check_compatible(base, sources[name])
            tokenizer = self._load_tokenizer(modelpool)
            self._check_vocabularies(modelpool, tokenizer, source_names)
            cfg = base.config
            plan = make_plan(
                config,
                architecture=arch.name,
                source_names=source_names,
                num_layers=cfg.num_hidden_layers,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
            )
            dtype = self._output_dtype(modelpool, base)
            self._log_plan(plan, arch, dtype)
            rows, shared_gate_rows = self._router_rows(plan, arch, modelpool, base, tokenizer)
            if streaming:
                conds = stream_moe_checkpoint(
                    plan,
                    arch,
                    base,
                    sources,
                    rows,
                    dtype,
                    self.save_checkpoint,
                    params=config.record(),
                    tokenizer=tokenizer,
                    base_dir=pool_model_path(modelpool, "_pretrained_"),
                    overwrite=self.overwrite,
                    shared_gate_rows=shared_gate_rows,
                )
            else:
                model = build_moe_model(
                    plan, arch, base, sources, rows, dtype, shared_gate_rows=shared_gate_rows
                )
        finally:
            for src in (base, *sources.values()):
                src.close()

        if not streaming:
            with engine_threads():
                conds = [_router_condition(model, arch, layer, plan) for layer in plan.moe_layers]
            model.config.moe_ct = plan.record(config.record(), conds)
        log.info(
            "Router condition numbers per layer: min %.4f, max %.4f",
            min(conds),
            max(conds),
        )
        if streaming:
            log.info(
                "streaming: the MoE model was written to %s and is not kept in memory; run() "
                "returns None, so FusionBench skips its evaluation. Evaluate the checkpoint "
                "with e.g. `fusion_bench method=dummy modelpool=CausalLMPool/moe_ct_upcycle "
                "modelpool.models._pretrained_=%s taskpool=...`.",
                self.save_checkpoint,
                self.save_checkpoint,
            )
            return None
        if self.save_checkpoint:
            with engine_threads():
                save_model_checkpoint(
                    model, arch, self.save_checkpoint, tokenizer, overwrite=self.overwrite
                )
        return model

    # -- helpers -------------------------------------------------------------------------

    def _load_tokenizer(self, modelpool: Any) -> Any:
        if getattr(modelpool, "tokenizer", None) is None:
            return None
        try:
            return modelpool.load_tokenizer()
        except Exception as err:
            raise ValueError(f"The model pool's tokenizer cannot be loaded: {err}") from err

    def _check_vocabularies(self, modelpool: Any, tokenizer: Any, source_names: list[str]) -> None:
        """Every source directory that ships a tokenizer must share the base vocabulary."""
        reference = tokenizer
        base_dir = pool_model_path(modelpool, "_pretrained_")
        if reference is None and base_dir is not None and _has_tokenizer(base_dir):
            reference = _auto_tokenizer(base_dir)
        if reference is None:
            return
        vocab = reference.get_vocab()
        for name in source_names:
            directory = pool_model_path(modelpool, name)
            if directory is None or not _has_tokenizer(directory):
                continue
            other = _auto_tokenizer(directory).get_vocab()
            if other != vocab:
                diff = sorted(set(other.items()) ^ set(vocab.items()))[:1]
                raise SourceError(
                    f"Source '{name}' has a tokenizer whose vocabulary differs from the base "
                    f"({len(other)} vs {len(vocab)} entries, e.g. {diff}); experts must share "
                    "the base tokenizer."
                )

    def _output_dtype(self, modelpool: Any, base: TensorSource) -> torch.dtype:
        requested = self.dtype
        if requested in (None, "auto"):
            kwargs = getattr(modelpool, "model_kwargs", None) or {}
            requested = kwargs.get("torch_dtype") or kwargs.get("dtype")
        return resolve_dtype(requested, base)

    def _router_rows(
        self, plan: MoEPlan, arch: Any, modelpool: Any, base: TensorSource, tokenizer: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per layer, the router rows of the expert groups and (when ``prompts`` has a
        ``shared_expert`` entry) the (1, H) Qwen2-MoE shared-expert gate."""
        from .prompt_gates import SHARED_EXPERT_PROMPTS, parse_prompts, prompt_router_rows

        cfg = base.config
        raw = to_plain(self.prompts)
        wants_shared = isinstance(raw, dict) and SHARED_EXPERT_PROMPTS in raw
        if wants_shared and not arch.has_shared_expert:
            raise ValueError(
                f"prompts.{SHARED_EXPERT_PROMPTS} sets the shared expert's gate, which the "
                f"{arch.name} output has not; use architecture: qwen2_moe or drop that entry."
            )
        if plan.gate_mode not in PROMPT_GATE_MODES:
            if wants_shared:
                raise ValueError(
                    f"prompts.{SHARED_EXPERT_PROMPTS} needs gate_mode hidden or cheap_embed "
                    f"(gate_mode is {plan.gate_mode!r}); set one, or drop that entry."
                )
            return prompt_free_router_rows(plan, cfg.num_hidden_layers, cfg.hidden_size), None
        names = [g.name for g in plan.groups]
        prompts = parse_prompts(
            raw, names + [SHARED_EXPERT_PROMPTS] if wants_shared else names, plan.gate_mode
        )
        if tokenizer is None:
            raise ValueError(
                f"gate_mode '{plan.gate_mode}' needs a tokenizer: set `tokenizer:` in the model "
                "pool (e.g. the base model's path)."
            )
        dense = modelpool.load_model("_pretrained_")
        try:
            rows = prompt_router_rows(dense, tokenizer, prompts, plan.gate_mode)
        finally:
            del dense
        if not wants_shared:
            return rows, None
        return [r[:-1] for r in rows], [r[-1:] for r in rows]

    def _log_plan(self, plan: MoEPlan, arch: Any, dtype: torch.dtype) -> None:
        anchors = [plan.expert_names[i] for i in plan.anchor_indices]
        log.info("MoE-CT: %s", plan.describe(dtype))
        log.info("Experts: %s", ", ".join(plan.expert_names))
        log.info("Alpha per layer: %s", ", ".join(f"{a:.3f}" for a in plan.alphas))
        log.info(
            "Anchor experts: %s (router rows x %s)",
            ", ".join(anchors) if anchors else "none",
            plan.router_aux_scale if anchors else 1.0,
        )


def _router_condition(model: Any, arch: Any, layer: int, plan: MoEPlan) -> float:
    router = arch.moe_block(model.model.layers[layer]).gate.weight
    return condition_number(router[:: plan.granularity].detach())


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        directory / "tokenizer_config.json"
    ).is_file()


def _auto_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
