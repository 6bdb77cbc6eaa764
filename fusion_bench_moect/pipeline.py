"""The build pipeline, shared by ``OrthogonalMoECTMergingAlgorithm`` and the lean CLI.

Open the base and the sources, check that they are compatible and share one vocabulary,
plan the experts, choose the output dtype, compute the router rows, then build the MoE
model in memory or stream it to disk (docs/algorithm.md). The two front ends differ only in
where models come from (``ModelInputs``): a FusionBench model pool, or directories named on
the command line. Nothing here imports FusionBench, so the lean CLI starts fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import arch as arch_registry
from .build import (
    MoEEngine,
    check_compatible,
    engine_threads,
    is_ffn_key,
    prompt_free_router_rows,
)
from .inspection import moe_block
from .io.checkpoint import check_destination
from .io.mapped import mapped_model
from .io.sources import SourceError, TensorSource, read_vocabulary, resolve_dtype
from .model_card import build_card
from .non_expert import make_non_expert_merge
from .ops.routers import condition_number
from .params import PROMPT_GATE_MODES, MoECTConfig
from .plan import BASE_EXPERT, MoEPlan, make_plan
from .prompt_gates import SHARED_EXPERT_PROMPTS, parse_prompts, prompt_router_rows

log = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    """Where the pipeline's models, tokenizer and defaults come from.

    Attributes:
        source_names: The source experts, in expert order (empty for pure upcycling).
        open: Opens a model by name (``_pretrained_`` or a source name) given the opened base
            (None when opening the base; a LoRA adapter source is read over it).
        directory: A model's local directory by name, or None (tokenizer and generation
            config files are read from there).
        tokenizer: A tokenizer object to save with the model (FusionBench's pool).
        tokenizer_dir: Or a directory whose tokenizer files are copied (lean CLI).
        vocabulary_dir: The directory of the tokenizer the output gets, when it is not
            ``tokenizer_dir`` (the pool's ``tokenizer`` path): sources must match it.
        default_dtype: The output dtype when ``dtype`` is null (the pool's ``model_kwargs`` dtype).
        load_dense: Loads the dense base model (prompt gates need a forward pass).
        output_config: For streaming, returns the output's transformers config given
            ``(plan, arch, dtype)``; it is called after the tensors are written.
        max_shard_bytes: Largest checkpoint shard (default 2 GB).
        given: How the user gave a model, by name (a path or hub id), for the model card's
            ``base_model``; default its ``directory``.
    """

    source_names: Sequence[str]
    open: Callable[[str, TensorSource | None], TensorSource]
    directory: Callable[[str], Path | None]
    tokenizer: Any = None
    tokenizer_dir: Path | None = None
    vocabulary_dir: Path | None = None
    default_dtype: Any = None
    load_dense: Callable[[], torch.nn.Module] | None = None
    output_config: Callable[[MoEPlan, Any, torch.dtype], Any] | None = None
    max_shard_bytes: int | None = None
    given: Callable[[str], Any] | None = None


@dataclass
class BuildResult:
    """The MoE model (None when streamed) and every layer's router condition number."""

    model: torch.nn.Module | None
    condition_numbers: list[float]


def run_pipeline(config: MoECTConfig, inputs: ModelInputs) -> BuildResult:
    """Build the MoE model described by ``config`` from ``inputs``.

    With ``config.save_checkpoint`` the checkpoint is written (atomically); with
    ``config.streaming`` it is written shard by shard and no model is kept in memory.

    Raises:
        ValueError: For bad parameters or incompatible models (``SourceError``), naming the
            culprit; nothing is left on disk.
    """
    if config.streaming and not config.save_checkpoint:
        raise ValueError(
            "streaming: true writes the model straight to disk and needs save_checkpoint: "
            "<directory>; set it, or set streaming: false to get the model in memory."
        )
    if config.save_checkpoint:
        check_destination(config.save_checkpoint, config.overwrite, input_directories(inputs))
    with _opened(inputs) as (base, sources):
        engine = prepare_engine(config, inputs, base, sources)
        if config.save_checkpoint:
            # Stream to disk; the in-memory model is then the written files, mapped.
            written: dict[str, Any] = {}
            conds = engine.stream(
                config.save_checkpoint,
                params=config.record(),
                tokenizer=inputs.tokenizer,
                tokenizer_dir=inputs.tokenizer_dir,
                base_dir=inputs.directory(BASE_EXPERT),
                overwrite=config.overwrite,
                max_shard_bytes=inputs.max_shard_bytes,
                config=_recorded_config(inputs, engine, written),
                fused_order=not config.streaming,
                card=output_card(inputs, config.save_checkpoint),
            )
            _log_conditions(conds)
            if config.streaming:
                return BuildResult(None, conds)
        else:
            model = engine.build_model()
    if config.save_checkpoint:
        return BuildResult(
            mapped_model(config.save_checkpoint, engine.arch, written["config"]), conds
        )
    return _finish_in_memory(config, engine, model)


def input_directories(inputs: ModelInputs) -> dict[str, Path]:
    """The local directories the build reads, by name (the output must not replace one)."""
    named = {name: inputs.directory(name) for name in (BASE_EXPERT, *inputs.source_names)}
    named["tokenizer"] = inputs.tokenizer_dir or inputs.vocabulary_dir
    return {name: path for name, path in named.items() if path is not None}


def output_card(inputs: ModelInputs, directory: str | os.PathLike) -> Callable[[Any], str]:
    """The output's model card given its final config: each model as the user gave it (a
    path or hub id; None for one given in memory), the directory's name as the title."""
    names = {}
    for name in (BASE_EXPERT, *inputs.source_names):
        given = inputs.given(name) if inputs.given is not None else None
        if not isinstance(given, (str, os.PathLike)):
            given = inputs.directory(name)
        names[name] = None if given is None else str(given)
    title = Path(directory).expanduser().absolute().name
    return lambda config: build_card(config.to_dict(), names, title)


def prepare_engine(
    config: MoECTConfig,
    inputs: ModelInputs,
    base: TensorSource,
    sources: dict[str, TensorSource],
) -> MoEEngine:
    """Check the opened models, plan the experts, pick the dtype, set up the non-expert
    merge, compute the router rows."""
    arch = arch_registry.resolve(config.architecture, base.config.model_type)
    arch_registry.check_base(arch, base.config)
    for source in sources.values():
        check_compatible(base, source)
    check_vocabularies(inputs)
    cfg = base.config
    plan = make_plan(
        config,
        family=arch,
        source_names=list(inputs.source_names),
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
    )
    requested = config.dtype if config.dtype not in (None, "auto") else inputs.default_dtype
    dtype = resolve_dtype(requested, base)
    log_plan(plan, dtype, arch)
    non_expert = make_non_expert_merge(
        config.non_expert_merge,
        config.non_expert_tensors,
        base,
        {name: sources[name] for name in inputs.source_names},
        [key for key in base.keys() if not is_ffn_key(key)],
        config.streaming,
    )
    rows, shared_gate_rows = router_rows(plan, config, base, inputs)
    return MoEEngine(plan, arch, base, sources, rows, dtype, shared_gate_rows, non_expert)


def _finish_in_memory(
    config: MoECTConfig, engine: MoEEngine, model: torch.nn.Module
) -> BuildResult:
    """Record the router condition numbers in the model's config."""
    plan = engine.plan
    with engine_threads():
        conds = [_router_condition(model, layer, plan) for layer in plan.moe_layers]
    model.config.moe_ct = engine.record(config.record(), conds)
    _log_conditions(conds)
    return BuildResult(model, conds)


@contextmanager
def _opened(inputs: ModelInputs) -> Iterator[tuple[TensorSource, dict[str, TensorSource]]]:
    """The base and every source, opened; all closed on the way out."""
    base = inputs.open(BASE_EXPERT, None)
    sources: dict[str, TensorSource] = {}
    try:
        for name in inputs.source_names:
            sources[name] = inputs.open(name, base)
        yield base, sources
    finally:
        for src in (base, *sources.values()):
            src.close()


def check_vocabularies(inputs: ModelInputs) -> None:
    """Every source directory that ships a tokenizer maps tokens to the same ids as the
    tokenizer the output gets (``vocabulary_dir``, ``tokenizer_dir``, ``tokenizer``, else the
    base directory's).

    Raises:
        SourceError: Naming the first source whose vocabulary differs.
    """
    reference = None
    for directory in (inputs.vocabulary_dir, inputs.tokenizer_dir):
        if directory is not None and reference is None:
            reference = read_vocabulary(directory)
    if reference is None and inputs.tokenizer is not None:
        reference = inputs.tokenizer.get_vocab()
    if reference is None and inputs.directory(BASE_EXPERT) is not None:
        reference = read_vocabulary(inputs.directory(BASE_EXPERT))
    if reference is None:
        return
    for name in inputs.source_names:
        directory = inputs.directory(name)
        vocab = None if directory is None else read_vocabulary(directory)
        if vocab is not None and vocab != reference:
            diff = sorted(set(vocab.items()) ^ set(reference.items()))[:1]
            raise SourceError(
                f"Source '{name}' has a tokenizer whose vocabulary differs from the base "
                f"({len(vocab)} vs {len(reference)} entries, e.g. {diff}); experts must share "
                "the base tokenizer."
            )


def router_rows(
    plan: MoEPlan, config: MoECTConfig, base: TensorSource, inputs: ModelInputs
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per layer, the float32 (num_groups, H) router rows of ``plan.gate_mode`` and (when
    ``prompts`` has a ``shared_expert`` entry, which ``make_plan`` has checked the family can
    take) the (1, H) weight of the shared expert's gate."""
    cfg = base.config
    wants_shared = isinstance(config.prompts, dict) and SHARED_EXPERT_PROMPTS in config.prompts
    if plan.gate_mode not in PROMPT_GATE_MODES:
        if wants_shared:
            raise ValueError(
                f"prompts.{SHARED_EXPERT_PROMPTS} needs gate_mode hidden or cheap_embed "
                f"(gate_mode is {plan.gate_mode!r}); set one, or drop that entry."
            )
        return prompt_free_router_rows(plan, cfg.num_hidden_layers, cfg.hidden_size), None
    rows = _prompt_rows(plan, config, inputs, wants_shared)
    if not wants_shared:
        return rows, None
    return [r[:-1] for r in rows], [r[-1:] for r in rows]


def _prompt_rows(
    plan: MoEPlan, config: MoECTConfig, inputs: ModelInputs, wants_shared: bool
) -> list[torch.Tensor]:
    """Router rows from prompts (one per group, then the shared expert's when wanted)."""
    names = [g.name for g in plan.groups]
    prompts = parse_prompts(
        config.prompts, names + [SHARED_EXPERT_PROMPTS] if wants_shared else names, plan.gate_mode
    )
    if inputs.tokenizer is None or inputs.load_dense is None:
        raise ValueError(
            f"gate_mode '{plan.gate_mode}' needs a tokenizer: set `tokenizer:` in the model "
            "pool (e.g. the base model's path)."
        )
    dense = inputs.load_dense()
    try:
        return prompt_router_rows(dense, inputs.tokenizer, prompts, plan.gate_mode)
    finally:
        del dense


def log_plan(plan: MoEPlan, dtype: torch.dtype, family: Any) -> None:
    """The plan in four log lines (summary, experts, alphas, anchors), then what llama.cpp
    would get wrong with it (docs/interop.md)."""
    anchors = [plan.expert_names[i] for i in plan.anchor_indices]
    log.info("MoE-CT: %s", plan.describe(dtype))
    log.info("Experts: %s", ", ".join(plan.expert_names))
    log.info("Alpha per layer: %s", ", ".join(f"{a:.3f}" for a in plan.alphas))
    log.info(
        "Anchor experts: %s (router rows x %s)",
        ", ".join(anchors) if anchors else "none",
        plan.router_aux_scale if anchors else 1.0,
    )
    # Advice for one runtime, not a fault of the model: part of the summary, not a warning.
    notes = family.llama_cpp_notes(
        plan.num_experts, plan.experts_per_token, plan.shared_expert_share
    )
    for note in notes:
        log.info("For llama.cpp: %s", note)


def _recorded_config(
    inputs: ModelInputs, engine: MoEEngine, written: dict[str, Any]
) -> Callable[[], Any]:
    """The output config, made after the tensors are written (``inputs.output_config`` or
    the engine's), also kept in ``written["config"]``."""

    def make() -> Any:
        if inputs.output_config is not None:
            config = inputs.output_config(engine.plan, engine.arch, engine.dtype)
        else:
            config = engine.output_config()
        written["config"] = config
        return config

    return make


def _log_conditions(conds: Sequence[float]) -> None:
    log.info("Router condition numbers per layer: min %.4f, max %.4f", min(conds), max(conds))


def _router_condition(model: Any, layer: int, plan: MoEPlan) -> float:
    router = moe_block(model.model.layers[layer]).gate.weight
    return condition_number(router[:: plan.granularity].detach())
