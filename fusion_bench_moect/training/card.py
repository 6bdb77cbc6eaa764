"""The model card of a model trained by ``moe_ct_training``: the run's record
(``config.moe_ct_training``: stage, steps, balancing, the data mixture or its plan), the
held-out perplexity during training, the history plot, then the recipe of the MoE it started
from (``model_card.recipe``). Pure (config dicts in, text out) but for ``card_file``, which
reads them from a finished run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..model_card import (
    CARD_FILE,
    PROJECT,
    RESULTS_BEGIN,
    RESULTS_END,
    code,
    front_matter,
    is_number,
    number,
    recipe,
    table,
    usage,
)
from .loop import TrainRun
from .plots import HISTORY_PLOT

_STAGES = {
    "router": "routers only",
    "experts": "routers and non-anchor experts",
    "router_then_experts": "routers for {router_warmup_steps} steps, then routers and "
    "non-anchor experts",
}


def training_card(
    config: Mapping[str, Any],
    trained_from: str | None,
    evaluations: Sequence[Mapping[str, Any]],
    title: str,
) -> str:
    """The card of a model trained by ``moe_ct_training``.

    Args:
        config: The trained model's config as a dict, with ``moe_ct_training`` (and the
            build's ``moe_ct``, when the MoE was built here).
        trained_from: The model training started from, as the user gave it.
        evaluations: The held-out evaluations during training (``step``, ``perplexity``).
        title: The card's heading (the directory's name).
    """
    run = config["moe_ct_training"]
    params = run["params"]
    family = config.get("model_type", "moe")
    tags = ["moe", "moe-ct", "fusion-bench", family, "moe-ct-training"]
    lines = [
        front_matter([trained_from] if trained_from else [], tags, "finetune"),
        f"# {title}",
        "",
        f"`{family}` Mixture-of-Experts model after continual training (`moe_ct_training`, "
        f"stage `{params['stage']}`) of {code(trained_from or 'an MoE')} with {PROJECT}, on "
        "Lightning Fabric. `config.json` holds the run's record (`moe_ct_training`)"
        + (" and the build's (`moe_ct`)." if "moe_ct" in config else "."),
        "",
        *_training(run, params),
        *_data(run, params),
        *_held_out(evaluations),
        "## History",
        "",
        f"![training history]({HISTORY_PLOT})",
        "",
        "Every step's record: `training_history.json`.",
        "",
    ]
    if "moe_ct" in config:
        lines += ["## The MoE it started from", "", *recipe(config, {})[2:]]
    return "\n".join([*lines, RESULTS_BEGIN, RESULTS_END, "", *usage()])


def card_file(run: TrainRun, directory: Path) -> dict[str, str]:
    """``{"README.md": the card}`` of a finished run saved to ``directory``."""
    model = run.module
    trained_from = str(getattr(model, "name_or_path", "") or "") or None
    text = training_card(model.config.to_dict(), trained_from, run.evaluations, directory.name)
    return {CARD_FILE: text}


def _training(run: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    stage = _STAGES.get(params["stage"], params["stage"]).format(**params)
    final = {k: v for k, v in (run.get("final") or {}).items() if is_number(v)}
    lines = [
        "## Training",
        "",
        f"- **Trained**: {stage}; anchors, the shared expert and every non-FFN weight frozen.",
        f"- **Steps**: {params['max_steps']} max, {params['batch_size']} windows of "
        f"{params['seq_len']} tokens per micro-batch and process, x "
        f"{params['accumulate_grad_batches']} accumulation; peak LR {params['learning_rate']}, "
        f"warm-up {params['warmup_steps']} (steps).",
        f"- **Balancing**: `{params['balancing']}` (aux loss weight "
        f"{params['router_aux_loss_coef']}, z-loss {params['router_z_loss_coef']}).",
    ]
    if final:
        shown = ", ".join(f"{k} {number(v)}" for k, v in final.items())
        lines.append(f"- **Last step**: {shown}.")
    return [*lines, ""]


def _data(run: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """The data mixture: the run's ``data_plan`` where it has one, else the sources."""
    lines = ["## Data", ""]
    plan = run.get("data_plan")
    sources = params.get("train_sources") or {}
    if not isinstance(sources, Mapping):
        sources = {f"source{i}": s for i, s in enumerate(sources)}
    if isinstance(plan, Mapping) and plan and all(isinstance(v, Mapping) for v in plan.values()):
        keys = list(dict.fromkeys(k for v in plan.values() for k in v))
        rows = [
            [name, _source(sources.get(name, "")), *(number(v.get(k)) for k in keys)]
            for name, v in plan.items()
        ]
        return lines + table(["source", "data", *keys], rows) + [""]
    if plan:
        return lines + ["```json", json.dumps(plan, indent=1), "```", ""]
    rows = [[name, _source(spec)] for name, spec in sources.items()]
    return lines + table(["source", "data"], rows) + [""]


def _source(spec: Any) -> str:
    """One training source in a table cell (inline text by its length)."""
    if isinstance(spec, Mapping) and isinstance(spec.get("text"), str):
        return f"inline text, {len(spec['text'])} characters"
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return code(text if len(text) <= 100 else text[:99] + "…")


def _held_out(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    if not evaluations:
        return []
    first, last = evaluations[0], evaluations[-1]
    rows = [
        [name, number(first["perplexity"].get(name)), number(ppl)]
        for name, ppl in last["perplexity"].items()
    ]
    headers = ["source", f"perplexity at step {first['step']}", f"at step {last['step']}"]
    return ["## Held-out perplexity", "", *table(headers, rows), ""]
