"""The merge grid: forgetting (English) vs plasticity (expert languages) of MoE-CT settings.

Every row merges the base SmolLM2 and the language experts with the package's FusionBench
method ``moe_ct_upcycling`` (``OrthogonalMoECTMergingAlgorithm.run(CausalLMPool)``, the
call FusionBench's program makes) and evaluates the MoE with the package's task pool
``MoETextTaskPool`` on the held-out Debian Reference chapters (identical tokens for every
row). The dense base and every dense expert are evaluated on the same tokens first.

Design (a full factorial is too expensive on a CPU):

* **main**: ``alpha_strategy`` x ``base_alpha`` (plus MoE-CT off, alpha = 1), Mixtral,
  with the base expert (anchor), ``router_aux_scale`` 1.1, orthogonal gates;
* **ablations**: one factor at a time around ``u_shaped``/0.8 (the setting docs/study.md
  examines) and ``constant``/0.8: no base expert, ``router_aux_scale`` 1.0, Qwen2-MoE;
* the rows the claims hinge on are repeated with extra router seeds (``focus_seeds``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusion_bench_moect.eval.routing import HEADLINE_METRICS

from .common import STUDY_MERGE, ensure_dir, gain_retained, make_pool, make_taskpool, specialisation
from .runs import RunLog

log = logging.getLogger(__name__)

STRATEGIES = ("constant", "u_shaped", "linear_increase", "linear_decrease")
BASE_ALPHAS = (0.5, 0.8, 1.0)
#: router_aux_scale values of claim 3's sweep beyond the study's 1.0 and 1.1 rows.
AUX_SWEEP = (1.5, 2.0, 3.0)
#: The fixed merge settings of every row.
DEFAULTS: dict[str, Any] = STUDY_MERGE.pick(
    "architecture",
    "include_base_expert",
    "router_aux_scale",
    "gate_mode",
    "experts_per_token",
    "moe_ct_mode",
    "seed",
)


def _row(name: str, group: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "group": group, "params": {**DEFAULTS, **params}}


def grid_rows(quick: bool = False, focus_seeds: Sequence[int] = ()) -> list[dict[str, Any]]:
    """The rows of the grid (``quick``: a handful, for a smoke run)."""
    rows = [_row("off", "main", moe_ct_mode=False, alpha_strategy="constant", base_alpha=1.0)]
    strategies = ("constant", "u_shaped") if quick else STRATEGIES
    alphas = (0.8,) if quick else BASE_ALPHAS
    for strategy in strategies:
        for alpha in alphas:
            rows.append(
                _row(f"{strategy}@{alpha}", "main", alpha_strategy=strategy, base_alpha=alpha)
            )
    centres = ("u_shaped",) if quick else ("u_shaped", "constant")
    for strategy in centres:
        centre = {"alpha_strategy": strategy, "base_alpha": 0.8}
        rows.append(
            _row(f"{strategy}@0.8 no-base", "ablation", include_base_expert=False, **centre)
        )
        rows.append(_row(f"{strategy}@0.8 aux1.0", "ablation", router_aux_scale=1.0, **centre))
        rows.append(
            _row(f"{strategy}@0.8 qwen2_moe", "ablation", architecture="qwen2_moe", **centre)
        )
    # Claim 3's limit: the anchor share as a function of router_aux_scale.
    for scale in (3.0,) if quick else AUX_SWEEP:
        rows.append(
            _row(
                f"u_shaped@0.8 aux{scale:g}",
                "aux-sweep",
                alpha_strategy="u_shaped",
                base_alpha=0.8,
                router_aux_scale=scale,
            )
        )
    focus = {
        "off",
        "constant@0.8",
        "u_shaped@0.8",
        "constant@0.8 aux1.0",
        "u_shaped@0.8 aux1.0",
        *(f"u_shaped@0.8 aux{scale:g}" for scale in AUX_SWEEP),
    }
    extra = []
    for seed in focus_seeds:
        if seed == DEFAULTS["seed"]:
            continue
        for row in rows:
            if row["name"] in focus:
                extra.append(
                    {
                        **row,
                        "group": row["group"] + "-seed",
                        "params": {**row["params"], "seed": seed},
                    }
                )
    rows = rows + extra
    for i, row in enumerate(rows):
        row["index"] = i
    return rows


OUT_OF_DOMAIN_EN = "/usr/share/common-licenses/GPL-3"
"""Out-of-domain English (a licence, not the Debian Reference the experts were tuned on):
forgetting of the base's general English, free of the in-domain gain."""

PRIORITY = ("off", "u_shaped@0.8", "constant@0.8", "u_shaped@0.8 aux1.0", "constant@0.8 aux1.0")


def priority_order(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Execution order: the rows the claims hinge on first (seed 42, then the other
    seeds), then the rest of the main grid, then the ablations; a run cut short by a time
    limit has the most important rows."""

    def key(row: Mapping[str, Any]) -> tuple[int, int, int]:
        name, seeded = row["name"], row["group"].endswith("-seed")
        if name in PRIORITY and not seeded:
            return (0, PRIORITY.index(name), 0)
        if seeded:
            return (1, PRIORITY.index(name) if name in PRIORITY else 9, row["index"])
        return (2 if row["group"] == "main" else 3, 0, row["index"])

    return sorted(rows, key=key)


def _key(row: Mapping[str, Any]) -> str:
    return f"{row['name']} seed{row['params']['seed']}"


def reference_reports(
    taskpool: Any, base_dir: str, experts: Mapping[str, str], dtype: str = "float32"
) -> dict[str, dict[str, Any]]:
    """Perplexity of the dense base and of every dense expert on the evaluation tokens."""
    from transformers import AutoModelForCausalLM

    reports = {}
    for name, path in {"base": base_dir, **experts}.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        started = time.perf_counter()
        report = taskpool.evaluate_model(model, label=name)
        reports[name] = {
            "perplexity": report["perplexity"],
            "overall_perplexity": report["overall_perplexity"],
            "seconds": time.perf_counter() - started,
        }
        log.info(
            "reference %s: %s", name, {k: round(v, 3) for k, v in report["perplexity"].items()}
        )
        del model
    return reports


def row_metrics(
    report: Mapping[str, Any], refs: Mapping[str, Mapping[str, Any]], expert_langs: Sequence[str]
) -> dict[str, Any]:
    """Forgetting / plasticity / routing numbers of one MoE report."""
    ppl = report["perplexity"]
    base = refs["base"]["perplexity"]
    m: dict[str, Any] = {f"ppl_{k}": v for k, v in ppl.items()}
    for src in ppl:
        if src not in expert_langs and src in base:
            m[f"forgetting_{src}"] = ppl[src] / base[src] - 1.0
    gains = []
    for lang in expert_langs:
        if lang not in ppl or lang not in refs:
            continue
        own = refs[lang]["perplexity"][lang]
        m[f"{lang}_vs_base"] = ppl[lang] / base[lang] - 1.0
        m[f"{lang}_vs_expert"] = ppl[lang] / own - 1.0
        g = gain_retained(ppl[lang], base[lang], own)
        m[f"{lang}_gain_retained"] = g
        if g is not None:
            gains.append(g)
    m["gain_retained"] = sum(gains) / len(gains) if gains else None
    routing = report.get("routing") or {}
    overall = routing.get("overall") or {}
    for k in (*HEADLINE_METRICS, "anchor_balanced_share"):
        m[k] = overall.get(k)
    for src, summary in (routing.get("per_source") or {}).items():
        m[f"anchor_share_{src}"] = summary.get("mean_anchor_share")
    layers = routing.get("layers") or []
    if layers and layers[0].get("shares") is not None:
        m["expert_shares"] = [
            sum(layer["shares"][j] for layer in layers) / len(layers)
            for j in range(len(layers[0]["shares"]))
        ]
    record = (report.get("model") or {}).get("moe_ct") or {}
    m.update(specialisation(routing.get("per_source_shares") or {}, record.get("experts")))
    m["per_source_shares"] = routing.get("per_source_shares")
    m["experts"] = record.get("experts")
    m["alphas"] = record.get("alphas")
    return m


def run_grid(
    base_dir: str,
    experts: Mapping[str, str],
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    eval_tokens: int = 2048,
    window_length: int = 256,
    dtype: str = "float32",
    resume: bool = False,
    sources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every row; write ``grid.json`` (settings, references, rows) in ``out_dir``.

    ``sources`` replaces the held-out Debian Reference sources (``{lang: spec}``, keys
    ``en`` + the expert languages), e.g. for tests."""
    out = ensure_dir(out_dir)
    row_dir = ensure_dir(out / "rows")
    langs = ["en", *[lang for lang in experts if lang != "en"]]
    sources = heldout_sources(langs) if sources is None else sources
    taskpool = make_taskpool(base_dir, langs, eval_tokens, window_length, sources)
    settings = {
        "eval_tokens_per_language": eval_tokens,
        "window_length": window_length,
        "dtype": dtype,
        "languages": langs,
        "sources": {k: str(v) for k, v in sources.items()},
        "experts": dict(experts),
    }
    runs = referenced_run_log(
        out / "grid.json", "rows", len(rows), settings, resume, taskpool, base_dir, experts
    )
    refs = runs.header["references"]
    for i, row in enumerate(priority_order(rows), 1):
        compute = functools.partial(
            _merge_and_evaluate, row, base_dir, experts, dtype, taskpool, refs, settings
        )
        path, index = row_path(row_dir, row), {"index": row.get("index", 0)}
        result = runs.run(path, compute, resume, index, settings=settings, params=row["params"])
        if result is None:
            continue
        m = result["metrics"]
        log.info(
            "[%d/%d] %s: en %+.2f%%, gain retained %.3f, anchor share %s, %.0f s",
            i,
            len(rows),
            _key(row),
            100 * m.get("forgetting_en", math.nan),
            m["gain_retained"] if m["gain_retained"] is not None else math.nan,
            m.get("mean_anchor_share"),
            result["seconds"],
        )
    return runs.dump()


def heldout_sources(langs: Sequence[str]) -> dict[str, Any]:
    """The held-out Debian Reference chapters of ``langs`` plus, when installed, the GPL-3
    text as out-of-domain English (``en_gpl3``)."""
    sources: dict[str, Any] = {
        lang: {"debian_reference": lang, "split": "heldout"} for lang in langs
    }
    if Path(OUT_OF_DOMAIN_EN).exists():
        sources["en_gpl3"] = OUT_OF_DOMAIN_EN
    return sources


def train_split_sources(langs: Sequence[str]) -> dict[str, Any]:
    """The train split of the Debian Reference in every language of ``langs`` (continued
    training's mixed text)."""
    return {lang: {"debian_reference": lang, "split": "train"} for lang in langs}


def row_path(folder: Path, row: Mapping[str, Any]) -> Path:
    """Where a row's result is saved (one JSON file per row and seed)."""
    return folder / (_key(row).replace(" ", "_").replace("@", "-") + ".json")


def referenced_run_log(
    summary: Path,
    runs_key: str,
    planned: int,
    settings: Mapping[str, Any],
    resume: bool,
    taskpool: Any,
    base_dir: str,
    experts: Mapping[str, str],
) -> RunLog:
    """A run log whose header holds the settings and the dense references' reports (saved
    next to ``summary`` as ``references.json``, reused by ``resume`` when the settings match)."""
    runs = RunLog(
        summary,
        {"settings": settings, "references": None},
        runs_key,
        planned,
        order=lambda r: r.get("index", 0),
    )
    runs.header["references"] = _references(
        summary.parent / "references.json", settings, resume, taskpool, base_dir, experts
    )
    return runs


def _references(
    path: Path,
    settings: Mapping[str, Any],
    resume: bool,
    taskpool: Any,
    base_dir: str,
    experts: Mapping[str, str],
) -> dict[str, Any]:
    """The dense references' reports: saved ones with the same settings, else evaluated."""
    saved = RunLog.finished(path, settings=settings) if resume else None
    if saved is not None:
        return saved["references"]
    refs = reference_reports(taskpool, base_dir, experts, settings["dtype"])
    path.write_text(json.dumps({"settings": settings, "references": refs}, indent=1))
    return refs


def _merge_and_evaluate(
    row: Mapping[str, Any],
    base_dir: str,
    experts: Mapping[str, str],
    dtype: str,
    taskpool: Any,
    refs: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """One grid row: merge with its parameters, evaluate, compute its metrics."""
    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    t0 = time.perf_counter()
    model = OrthogonalMoECTMergingAlgorithm(**row["params"]).run(
        make_pool(base_dir, experts, dtype)
    )
    merge_s = time.perf_counter() - t0
    report = taskpool.evaluate_model(model, label=row["name"])
    return {
        "index": row.get("index", 0),
        "name": row["name"],
        "group": row["group"],
        "params": dict(row["params"]),
        "settings": settings,
        "metrics": row_metrics(report, refs, list(experts)),
        "merge_seconds": merge_s,
        "seconds": time.perf_counter() - t0,
    }
