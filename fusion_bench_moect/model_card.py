"""The model card (``README.md``) of every output directory, as the Hugging Face Hub reads
it. Pure: config dicts in, text out (the file: ``io.model_card``).

YAML front matter (``base_model``: the base and the sources as the user gave them, paths or
hub ids; ``library_name: transformers``; tags with the output family), then the recipe in
words from the ``config.moe_ct`` record, and the task pool's results where the run evaluated
the model (``with_results``). A trained model's card: ``training.card``. The writers put the
card inside the checkpoint's temporary directory, so it appears with the model in the same
rename. A source's own README.md is never copied: it describes the source, not the MoE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .arch import ARCHITECTURES
from .params import DEFAULT_ANCHOR_ROUTER_SCALE, MoECTConfig

CARD_FILE = "README.md"
PROJECT = "fusion-bench-moect, a [FusionBench](https://github.com/tanganke/fusion_bench) plugin"
#: The evaluation section sits between these lines (rewritten after an evaluation).
RESULTS_BEGIN, RESULTS_END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"
BASE = "_pretrained_"
#: Parameters about where the output goes, not what it is.
_IO_PARAMS = ("save_checkpoint", "overwrite", "streaming")


def front_matter(base_model: Sequence[str], tags: Sequence[str], relation: str | None) -> str:
    """The card's YAML metadata block (``---`` lines included)."""
    meta: dict[str, Any] = {"base_model": list(base_model)} if base_model else {}
    if relation and base_model:
        meta["base_model_relation"] = relation
    meta.update(library_name="transformers", pipeline_tag="text-generation", tags=list(tags))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return lines


def number(value: Any) -> str:
    """A metric for a table: 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def code(value: Any) -> str:
    """``value`` as inline code."""
    return f"`{value}`"


# -- the build ---------------------------------------------------------------------------


def build_card(config: Mapping[str, Any], models: Mapping[str, str | None], title: str) -> str:
    """The card of a built MoE.

    Args:
        config: The output's config as a dict, with the ``moe_ct`` record.
        models: Each pool name (``_pretrained_`` first) as the user gave the model: a path or
            hub id, or None for a model given in memory.
        title: The card's heading (the directory's name).
    """
    record = config["moe_ct"]
    sources = [s for s in dict.fromkeys(record["expert_sources"]) if s != BASE]
    given = [models.get(name) for name in (BASE, *sources)]
    tags = ["moe", "moe-ct", "fusion-bench", record["architecture"], *(["merge"] * bool(sources))]
    base = code(models.get(BASE) or BASE)
    origin = (
        f"the dense base {base} and {len(sources)} fine-tune{'s' * (len(sources) > 1)} "
        f"({', '.join(map(code, sources))})"
        if sources
        else f"pure upcycling of the dense base {base}"
    )
    return "\n".join(
        [
            front_matter([g for g in given if g], tags, "merge" if len(given) > 1 else None),
            f"# {title}",
            "",
            f"A Mixture-of-Experts `{record['architecture']}` model made by MoE-CT upcycling with "
            f"{PROJECT}: {origin}. `config.json` holds the full record (`moe_ct`).",
            "",
            *recipe(config, models),
            RESULTS_BEGIN,
            RESULTS_END,
            "",
            *usage(),
        ]
    )


def recipe(config: Mapping[str, Any], models: Mapping[str, str | None]) -> list[str]:
    """The ``moe_ct`` record in words: shape, experts, alphas, routers, shared expert, balancing."""
    record, params = config["moe_ct"], config["moe_ct"]["params"]
    g, num_experts = record["granularity"], len(record["experts"])
    layers, moe_layers = len(record["alphas"]), record["moe_layers"]
    dense = sorted(set(range(layers)) - set(moe_layers))
    where = f"all {layers} decoder layers" if not dense else f"layers {_ranges(moe_layers)}"
    lines = [
        "## Recipe",
        "",
        f"- **Shape**: {num_experts} routed experts ({len(record['expert_sources'])} FFNs x "
        f"granularity {g}), top-{params['experts_per_token']} routing, MoE in {where}"
        + (f"; the base's dense FFN in layers {_ranges(dense)}" if dense else "")
        + (f", stored in {params['dtype']}" if params.get("dtype") else "")
        + ".",
        "- **Alpha** (weight of the source FFN in `lerp(base FFN, source FFN, alpha)`): "
        + _alphas(record, params),
        *_router(record, params),
        *_shared(record, params),
        *_balancing(record, params),
        *_changed_params(params),
        "",
        "### Experts",
        "",
        *_expert_table(record, params, models),
        "",
    ]
    return lines


def _ranges(indices: Sequence[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    parts: list[list[int]] = []
    for i in indices:
        if parts and i == parts[-1][-1] + 1:
            parts[-1].append(i)
        else:
            parts.append([i])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def _alphas(record: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    alphas = record["alphas"]
    if all(s == BASE for s in record["expert_sources"]):
        return "none applies (pure upcycling: every expert starts as a copy of the base FFN)."
    if not params.get("moe_ct_mode", True):
        return "1 in every layer (`moe_ct_mode` off: each source's FFN as it is)."
    strategy = params["alpha_strategy"]
    name = "explicit per-layer values" if isinstance(strategy, list) else f"`{strategy}`"
    per_layer = ", ".join(f"{a:.3f}" for a in alphas)
    return (
        f"{name}, peak {params['base_alpha']}; per layer 0..{len(alphas) - 1}: {per_layer} "
        f"(min {min(alphas):.3f}, mean {sum(alphas) / len(alphas):.3f}, max {max(alphas):.3f})."
    )


def _router(record: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    family = ARCHITECTURES.get(record["architecture"])
    scoring = family.router_scoring if family is not None else "softmax"
    conds = record.get("router_condition_numbers") or []
    line = f"- **Routers**: `{params['gate_mode']}` initialisation (seed {params['seed']}"
    if params.get("gate_scale", 1.0) != 1.0:
        line += f", rows x {params['gate_scale']}"
    line += f"), {scoring} scores"
    if conds:
        low, high = f"{min(conds):.4g}", f"{max(conds):.4g}"
        line += (
            f"; condition number {low} in every layer"
            if low == high
            else (f"; condition number per layer {low} to {high}")
        )
    return [line + "."]


def _shared(record: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    ffns = record.get("shared_experts") or []
    family = ARCHITECTURES.get(record["architecture"])
    if not ffns or family is None or not family.has_shared_expert:
        return []
    names = " + ".join(code(f["name"]) for f in ffns)
    return [
        f"- **Shared expert** (always on): the FFN of {names}, carrying "
        f"{params['shared_expert_share']} of the output at the start."
    ]


def _balancing(record: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    family = ARCHITECTURES.get(record["architecture"])
    lines = []
    if family is not None and family.router_bias_name is not None:
        lines.append(
            f"- **Balancing**: a per-expert selection bias `{family.router_bias_name}`, zero at "
            "the start, added to the scores for the top-k choice only (what aux-loss-free "
            "balancing, `moe_ct_training balancing=bias`, trains)."
        )
    n_group, topk_group = params.get("n_group", 1), params.get("topk_group", 1)
    if n_group > 1:
        lines.append(
            f"- **Group-limited routing**: {n_group} expert groups per layer; a token's experts "
            f"come from its best {topk_group}."
        )
    return lines


def _changed_params(params: Mapping[str, Any]) -> list[str]:
    defaults = MoECTConfig().record()
    changed = [
        f"`{k}: {json.dumps(v)}`"
        for k, v in params.items()
        if k not in _IO_PARAMS and k in defaults and v != defaults[k]
    ]
    return [f"- **Parameters set**: {', '.join(changed)}."] if changed else []


def _expert_table(
    record: Mapping[str, Any], params: Mapping[str, Any], models: Mapping[str, str | None]
) -> list[str]:
    g, sources = record["granularity"], record["expert_sources"]
    anchors = set(record.get("anchor_experts") or [])
    names = [n.split("/")[0] for n in record["experts"][::g]]
    scale = params.get("router_aux_scale") or DEFAULT_ANCHOR_ROUTER_SCALE
    rows = []
    for r, (name, source) in enumerate(zip(names, sources, strict=True)):
        where = code(models.get(source) or source)
        if source == BASE:
            made = f"the base FFN ({where})"
        elif params.get("moe_ct_mode", True):
            made = f"lerp(base FFN, FFN of {where}, alpha)"
        else:
            made = f"the FFN of {where}"
        anchor = f"yes (router rows x {scale})" if r * g in anchors else ""
        first, last = r * g, r * g + g - 1
        rows.append([f"{first}-{last}" if g > 1 else first, code(name), made, anchor])
    return table(["experts", "name", "made from", "anchor"], rows)


def usage() -> list[str]:
    """How to load the directory."""
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
    ]


# -- results -------------------------------------------------------------------------------


def results_section(report: Mapping[str, Any]) -> list[str]:
    """The task pool's report as Markdown: per-source perplexity (with the reference model and
    the ratio) for ``MoETextTaskPool``; else one table per set of metrics, a row per task
    (``{task: {metric: value}}``, lm-eval's ``results`` included)."""
    lines = [
        "## Evaluation",
        "",
        "The task pool's results for this model (FusionBench's report):",
        "",
    ]
    if isinstance(report.get("sources"), Mapping) and isinstance(report.get("perplexity"), Mapping):
        return lines + _perplexity_table(report)
    tasks = report.get("results") if isinstance(report.get("results"), Mapping) else report
    groups: dict[tuple[str, ...], list[list[Any]]] = {}
    for task, metrics in tasks.items():
        if isinstance(metrics, Mapping):
            numeric = {k: v for k, v in metrics.items() if is_number(v)}
            if numeric:
                groups.setdefault(tuple(numeric), []).append([task, *numeric.values()])
    for metrics, rows in groups.items():
        lines += table(["task", *metrics], [[r[0], *map(number, r[1:])] for r in rows]) + [""]
    scalars = [f"`{k}` {number(v)}" for k, v in tasks.items() if is_number(v)]
    return lines + ([", ".join(scalars) + ".", ""] if scalars else [])


def is_number(value: Any) -> bool:
    """A metric value (not a flag)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _perplexity_table(report: Mapping[str, Any]) -> list[str]:
    references = report.get("references") or {}
    ref_name = next(iter(references), None)
    ref_ppl = references[ref_name]["perplexity"] if ref_name else {}
    ratio = report.get("perplexity_ratio") or {}
    headers = ["source", "tokens", "perplexity"]
    if ref_name:
        headers += [f"`{ref_name}` perplexity", "ratio"]
    rows = []
    for name, details in report["sources"].items():
        row = [name, details.get("scored_tokens"), number(report["perplexity"][name])]
        if ref_name:
            row += [number(ref_ppl.get(name)), number(ratio.get(name))]
        rows.append(row)
    lines = table(headers, rows) + [
        "",
        f"Overall perplexity {number(report['overall_perplexity'])}.",
    ]
    overall = (report.get("routing") or {}).get("overall")
    if overall:
        lines[-1] += (
            f" Routing over {overall.get('tokens')} tokens: CV {number(overall.get('mean_cv'))}, "
            f"MaxVio {number(overall.get('mean_max_violation'))}, dead experts "
            f"{number(overall.get('dead_experts'))}."
        )
    return lines + [""]


def with_results(card: str, report: Mapping[str, Any]) -> str:
    """``card`` with its evaluation section replaced by ``report``'s."""
    head, found, rest = card.partition(RESULTS_BEGIN)
    _, found_end, tail = rest.partition(RESULTS_END)
    if not (found and found_end):
        raise ValueError(f"The card has no {RESULTS_BEGIN} ... {RESULTS_END} section.")
    body = "\n".join(results_section(report))
    return f"{head}{RESULTS_BEGIN}\n{body}\n{RESULTS_END}{tail}"
