"""Shared pieces of the study: model pools, the evaluation task pool and metric helpers."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fusion_bench_moect.eval.routing import HEADLINE_METRICS
from fusion_bench_moect.params import MoECTConfig

#: The study's merge: the schema's defaults with Mixtral output and the anchor's router rows
#: scaled by 1.1 explicitly (the setting whose claims the study tests).
STUDY_MERGE = MoECTConfig(architecture="mixtral", router_aux_scale=1.1)
EVAL_LANGS = ("en", "de", "fr", "es")
"""Held-out languages evaluated for every model: English (the base's) + the expert languages."""


def make_pool(
    base_dir: str | os.PathLike,
    experts: Mapping[str, str | os.PathLike],
    dtype: str = "float32",
    in_memory: Mapping[str, nn.Module] | None = None,
) -> Any:
    """A FusionBench ``CausalLMPool``: ``_pretrained_`` = the base, one entry per expert.

    ``in_memory`` replaces pool entries by models already in memory (e.g. a freshly merged
    MoE as ``_pretrained_`` for ``moe_ct_training``).
    """
    from fusion_bench.modelpool import CausalLMPool

    models = {"_pretrained_": str(base_dir), **{k: str(v) for k, v in experts.items()}}
    if not in_memory:
        return CausalLMPool(
            models=models, tokenizer=str(base_dir), model_kwargs={"torch_dtype": dtype}
        )

    class _Pool(CausalLMPool):
        def load_model(self, name: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(name, str) and name in in_memory:
                return in_memory[name]
            return super().load_model(name, *args, **kwargs)

    return _Pool(models=models, tokenizer=str(base_dir), model_kwargs={"torch_dtype": dtype})


def make_taskpool(
    tokenizer_dir: str | os.PathLike,
    langs: Sequence[str] = EVAL_LANGS,
    tokens: int = 2048,
    window_length: int = 256,
    sources: Mapping[str, Any] | None = None,
) -> Any:
    """The package's ``MoETextTaskPool`` on the held-out Debian Reference chapters (its
    routing report gives each source's mean expert shares, ``per_source_shares``)."""
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

    return MoETextTaskPool(
        sources=dict(sources)
        if sources is not None
        else {lang: {"debian_reference": lang, "split": "heldout"} for lang in langs},
        max_tokens_per_source=tokens,
        window_length=window_length,
        batch_size=4,
        tokenizer=str(tokenizer_dir),
        reference_models=[],
        plots=False,
        show_progress=False,
    )


def specialisation(
    per_source_shares: Mapping[str, Sequence[float]],
    experts: Sequence[str] | None,
    reference: str = "en",
) -> dict[str, float]:
    """For every expert named like a source language: its share on its own language's
    tokens, and that share minus its share on ``reference`` (English) tokens."""
    out: dict[str, float] = {}
    if not experts or reference not in per_source_shares:
        return out
    diffs = []
    for j, name in enumerate(experts):
        if name in per_source_shares and name != reference:
            own = per_source_shares[name][j]
            out[f"own_share_{name}"] = own
            diffs.append(own - per_source_shares[reference][j])
    if diffs:
        out["specialisation"] = sum(diffs) / len(diffs)
    return out


def curve_point(
    evaluation: Mapping[str, Any], experts: Sequence[str] | None = None
) -> dict[str, Any]:
    """One held-out evaluation during training (``MoECTTrainingAlgorithm.evaluations``):
    step, perplexity (overall and per source), balance, and specialisation of ``experts``."""
    return {
        "step": evaluation["step"],
        "overall_perplexity": evaluation.get("overall_perplexity"),
        "perplexity": evaluation.get("perplexity"),
        **{k: evaluation[k] for k in HEADLINE_METRICS if k in evaluation},
        **specialisation(evaluation.get("per_source_shares") or {}, experts),
    }


def gain_retained(ppl: float, base: float, expert: float) -> float | None:
    """Share of the expert's log-perplexity gain over the base that a model keeps:
    1 = as good as the expert, 0 = as good as the base, < 0 = worse than the base."""
    denom = math.log(base) - math.log(expert)
    if abs(denom) < 1e-9:
        return None
    return (math.log(base) - math.log(ppl)) / denom


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` std for fewer than two values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def pm(values: Sequence[float | None], digits: int = 3, pct: bool = False) -> str:
    """``mean ± std`` of the finite values (``pct``: as a signed percentage)."""
    mean, std = mean_std(values)
    if mean is None:
        return "n/a"
    if pct:
        s = f"{100 * mean:+.2f}%"
        return s if std is None else f"{s} ± {100 * std:.2f}"
    s = f"{mean:.{digits}f}"
    return s if std is None else f"{s} ± {std:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def fmt(value: Any, digits: int = 3) -> str:
    """A compact table cell."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
