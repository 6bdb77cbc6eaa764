"""The parameters of ``moe_ct_training``: one schema, every other listing derived from it.

``TrainingConfig`` holds each parameter with its default, a one-line description and its
checks. ``MoECTTrainingAlgorithm``'s signature and ``Args:`` docstring,
``config/method/moe_ct_training.yaml`` (``method_yaml``) and the parameter table of
docs/training.md (``parameter_table``) are generated from it; tests compare the committed files
with the generated text. Every value is checked when the algorithm is constructed, before any
data or model is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..schema import (
    args_docstring,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_path,
    markdown_table,
    param,
    plain,
    run_checks,
)
from ..schema import (
    method_yaml as schema_yaml,
)

STAGES = ("router", "experts", "router_then_experts")
CLIP_ALGORITHMS = ("norm", "value")
BALANCING = ("aux_loss", "bias", "aux_loss+bias", "none")
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
#: transformers 5's implementations of the experts' forward (``config.experts_implementation``).
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _sources(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (Mapping, list, tuple)):
        return plain(value)
    raise ValueError(
        f"{name} must map names to sources ({{de: {{debian_reference: de}}}}) or list them, "
        f"got {value!r}."
    )


def _target(name: str, value: Any) -> Any:
    if value is None:
        return None
    value = plain(value)
    if not (isinstance(value, Mapping) and "_target_" in value):
        raise ValueError(f"{name} must be null or a config with a _target_, got {value!r}.")
    return value


def _scheduler(name: str, value: Any) -> Any:
    return value if value == "constant" else _target(name, value)


def _anchors(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value]
    return [check_int(0)(name, v) for v in plain(value)]


def _clip(name: str, value: Any) -> float | None:
    value = check_float(0.0, optional=True)(name, value)
    return None if not value else value


_TRAIN_EXAMPLE = (
    "\n  de: {debian_reference: de, split: train}\n  fr: {debian_reference: fr, split: train}"
)


@dataclass(frozen=True)
class TrainingConfig:
    """Every parameter of ``moe_ct_training``, checked (see docs/training.md)."""

    train_sources: Any = param(
        None,
        "name -> file / folder / glob / .jsonl / .parquet / .arrow / {debian_reference: LANG, "
        "split: train} / {jsonl|parquet|arrow: PATH, field: text} / {dataset: DIR_OR_NAME, "
        "split: train, field: text} / {text: ...}; add weight: W to every source for a "
        "weighted mixture",
        check=_sources,
        yaml=_TRAIN_EXAMPLE,
    )
    stage: str = param(
        "router",
        "router | experts (routers + non-anchor experts) | router_then_experts",
        check=check_choice(STAGES),
    )
    router_warmup_steps: int = param(
        0, "router-only steps of router_then_experts", check=check_int(0)
    )
    max_steps: int = param(
        50, "optimiser steps (-1: until max_epochs)", check=check_int(1, unlimited=-1)
    )
    max_epochs: int = param(
        -1, "passes over the data (-1: until max_steps)", check=check_int(1, unlimited=-1)
    )
    batch_size: int = param(4, "windows per micro-batch per process", check=check_int(1))
    seq_len: int = param(256, "tokens per window", check=check_int(2))
    accumulate_grad_batches: int = param(1, "micro-batches per optimiser step", check=check_int(1))
    learning_rate: float = param(
        1e-4,
        "peak LR of the default AdamW (no weight decay) + cosine schedule",
        check=check_float(0.0, low_open=True),
    )
    warmup_steps: int = param(
        0,
        "linear warm-up steps of the default schedule, from learning_rate/(warmup_steps+1)",
        check=check_int(0),
    )
    min_learning_rate: float = param(
        0.0, "final LR of the default cosine schedule", check=check_float(0.0)
    )
    optimizer: Any = param(
        None,
        "{_target_: torch.optim.AdamW, lr: ...}; null = AdamW(learning_rate, weight_decay=0)",
        check=_target,
    )
    lr_scheduler: Any = param(
        None,
        "{_target_: ..., T_max: _T_max_}; null = FusionBench's CosineDecayWithWarmup; "
        "constant = none",
        check=_scheduler,
    )
    gradient_clip_val: float | None = param(
        1.0, "clipping threshold (null or 0 = off)", check=_clip
    )
    gradient_clip_algorithm: str = param(
        "norm", "norm | value", check=check_choice(CLIP_ALGORITHMS)
    )
    router_aux_loss_coef: float = param(
        0.01, "weight of the architecture's load-balancing loss", check=check_float(0.0)
    )
    aux_loss_ramp_steps: int = param(
        0, "linear ramp of that weight over the first steps (0 = none)", check=check_int(0)
    )
    router_z_loss_coef: float = param(0.0, "router z-loss weight (0 = off)", check=check_float(0.0))
    balancing: str = param(
        "aux_loss",
        "aux_loss | bias (aux-loss-free router bias; outputs with one) | aux_loss+bias | none",
        check=check_choice(BALANCING),
    )
    bias_update_rate: float = param(
        1e-3,
        "bias step per optimiser step: b_i += rate * sign(mean load - load_i) (DeepSeek-V3)",
        check=check_float(0.0, low_open=True),
    )
    bias_update_ramp_steps: int = param(
        0, "linear ramp of that rate over the first steps (0 = none)", check=check_int(0)
    )
    aux_loss_scope: str = param(
        "micro_batch",
        "micro_batch | global_batch (expert loads all-reduced over processes and the step's "
        "micro-batches, Qwen's global-batch balancing)",
        check=check_choice(AUX_LOSS_SCOPES),
    )
    anchor_experts: list[int] | None = param(
        None, "frozen experts; null = the model's config.moe_ct.anchor_experts", check=_anchors
    )
    experts_implementation: str | None = param(
        None,
        "transformers 5 experts kernel: eager | batched_mm | grouped_mm; null = transformers' "
        "default (grouped_mm: the fastest deterministic one measured, docs/benchmarks.md)",
        check=lambda n, v: None if v is None else check_choice(EXPERTS_IMPLEMENTATIONS)(n, v),
    )
    max_tokens_per_source: int | None = param(
        None,
        "cap on tokens read per source, logged with what it drops (null = every token)",
        check=check_int(1, optional=True),
    )
    data_cache_dir: str | None = param(
        None,
        "where the token stores go (null = ~/.cache/fusion_bench_moect/token_stores, or "
        "$FUSION_BENCH_MOECT_CACHE/token_stores)",
        check=check_optional_path,
    )
    seed: int = param(0, "data order seed (one permutation per epoch)", check=check_int())
    log_every: int = param(
        10, "steps between log lines (loggers get every step)", check=check_int(1)
    )
    eval_sources: Any = param(
        None,
        "held-out sources evaluated during training, e.g. {en: {debian_reference: en}}",
        check=_sources,
    )
    eval_every: int = param(
        0, "steps between evaluations (0 = before and after training only)", check=check_int(0)
    )
    eval_max_tokens_per_source: int = param(
        4096, "tokens evaluated per held-out source", check=check_int(1)
    )
    eval_window: int = param(
        512,
        "tokens per evaluation window (the task pool's default, so perplexities compare)",
        check=check_int(2),
    )
    eval_batch_size: int = param(4, "windows per evaluation forward pass", check=check_int(1))
    checkpoint_every: int = param(
        0, "steps between resumable step checkpoints (0 = none)", check=check_int(0)
    )
    keep_last: int | None = param(
        2, "step checkpoints kept (older ones are removed; null = all)", check=check_int(1, True)
    )
    checkpoint_dir: str | None = param(
        None,
        "where step-NNNNNN/ checkpoints go; null = <save_checkpoint>-checkpoints",
        check=check_optional_path,
    )
    ckpt_path: str | None = param(
        None, "a step-NNNNNN checkpoint to resume from", check=check_optional_path
    )
    save_checkpoint: str | None = param(
        None,
        "directory for the trained model + training_history.json/.png",
        check=check_optional_path,
    )
    overwrite: bool = param(False, "replace a non-empty save_checkpoint", check=check_bool)
    accelerator: str = param(
        "auto", "Python API only (no program fabric); the CLI uses fabric.accelerator"
    )
    precision: str = param("32-true", "Python API only; the CLI uses fabric.precision")
    tokenizer: str | None = param(
        None,
        "tokenizer directory when the pool has none (null = the pool's)",
        check=check_optional_path,
    )

    def __post_init__(self) -> None:
        run_checks(self)
        if self.stage == "router_then_experts" and self.router_warmup_steps < 1:
            raise ValueError("stage router_then_experts needs router_warmup_steps >= 1.")
        if self.max_steps == -1 and self.max_epochs == -1:
            raise ValueError(
                "max_steps and max_epochs are both -1 (no limit): training would not end; "
                "set max_steps (optimiser steps) or max_epochs (passes over the data)."
            )
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"min_learning_rate={self.min_learning_rate} exceeds learning_rate="
                f"{self.learning_rate}; the cosine schedule decays from the second to the first."
            )

    @classmethod
    def names(cls) -> list[str]:
        """The parameter names, in schema order."""
        return [f.name for f in dataclasses.fields(cls)]

    def record(self) -> dict[str, Any]:
        """Every parameter as a plain JSON-able value."""
        return {name: plain(getattr(self, name)) for name in self.names()}


def method_yaml() -> str:
    """``config/method/moe_ct_training.yaml``, FusionBench's banner included."""
    notes = [
        "The pool's _pretrained_ is the MoE checkpoint; anchors, the shared expert and every",
        "non-FFN weight stay frozen. Global batch = batch_size x processes x",
        "accumulate_grad_batches windows of seq_len tokens. Generated from",
        "fusion_bench_moect/training/config.py (TrainingConfig); see docs/training.md.",
    ]
    return schema_yaml(
        TrainingConfig,
        "fusion_bench_moect.MoECTTrainingAlgorithm",
        "continual training of an MoE (fusion-bench-moect)",
        notes,
        width=28,
    )


def parameter_table() -> str:
    """The Markdown parameter table of docs/training.md."""
    return markdown_table(TrainingConfig)


def docstring(summary: str) -> str:
    """An algorithm docstring: ``summary`` and the generated ``Args:`` section."""
    return summary.rstrip() + "\n\n" + args_docstring(TrainingConfig)


def uses_aux_loss(config: TrainingConfig) -> bool:
    """Whether the load-balancing loss is added to the training loss."""
    return config.balancing in ("aux_loss", "aux_loss+bias")


def uses_bias(config: TrainingConfig) -> bool:
    """Whether the routers' selection biases are updated after each optimiser step."""
    return config.balancing in ("bias", "aux_loss+bias")
