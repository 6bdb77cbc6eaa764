"""Claim 2 on the trained model: forgetting and plasticity after continued training.

The seed's claim (the U-shaped schedule protects the base while keeping the experts' gains)
is about the model users go on to train. For each claim row and router seed: merge with
``moe_ct_upcycling``, evaluate, run a ``router`` stage of ``moe_ct_training`` (routers
only), evaluate, then an ``experts`` stage (routers + non-anchor experts, anchors frozen:
the MoE-CT / MoE-LPR recipe), evaluate. Training text is the train split of the Debian
Reference in English and every expert language, mixed; every evaluation uses the grid's
held-out tokens and metrics (``grid.row_metrics``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.routing import STEP_METRICS

from .common import curve_point, ensure_dir, make_pool, make_taskpool
from .grid import (
    _key,
    grid_rows,
    heldout_sources,
    referenced_run_log,
    row_metrics,
    row_path,
    train_split_sources,
)

log = logging.getLogger(__name__)

#: The rows the claim compares: MoE-CT off and the two schedules at base_alpha 0.8 (more
#: rows with ``--trained-rows``; each costs about 5 CPU minutes per seed).
TRAINED_ROWS = ("off", "constant@0.8", "u_shaped@0.8")
#: Evaluation points of every run, in order.
POINTS = ("merged", "router", "experts")
#: Optional row entries: ``model`` (``dense``: the base alone is upcycled, by the row's
#: ``params``), ``replay`` (a label) and ``train_sources`` (the row's own training mixture).
ROW_ENTRIES = ("model", "replay", "train_sources")


def trained_rows(seeds: Sequence[int], names: Sequence[str] = TRAINED_ROWS) -> list[dict[str, Any]]:
    """The grid rows named ``names``, once per router seed."""
    by_name = {row["name"]: row for row in grid_rows(quick=False)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"Unknown grid rows {unknown}; valid: {', '.join(by_name)}.")
    return [
        {**by_name[n], "params": {**by_name[n]["params"], "seed": seed}, "index": i}
        for i, (seed, n) in enumerate((s, n) for s in seeds for n in names)
    ]


def run_trained(
    base_dir: str,
    experts: Mapping[str, str],
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    router_steps: int = 30,
    experts_steps: int = 30,
    router_lr: float = 5e-4,
    experts_lr: float = 1e-4,
    batch_size: int = 2,
    seq_len: int = 64,
    train_tokens_per_language: int = 20_000,
    eval_tokens: int = 512,
    window_length: int = 256,
    resume: bool = False,
    eval_sources: Mapping[str, Any] | None = None,
    train_sources: Mapping[str, Any] | None = None,
    curve_every: int = 0,
    curve_eval_tokens: int = 256,
    summary: str = "trained.json",
) -> dict[str, Any]:
    """Merge, then train a router stage and an experts stage, evaluating after each;
    write ``summary`` in ``out_dir``.

    A row's ``trainer`` entry adds (or replaces) ``moe_ct_training`` parameters (e.g.
    ``balancing``); its ``ROW_ENTRIES`` give it its own mixture or a dense model.
    ``curve_every`` > 0 also evaluates ``curve_eval_tokens`` held-out tokens per source every
    that many steps of each stage (the run's ``curves``). ``eval_sources`` and
    ``train_sources`` replace the Debian Reference defaults (tests)."""
    out = ensure_dir(out_dir)
    run_dir = ensure_dir(out / "runs")
    langs = ["en", *[lang for lang in experts if lang != "en"]]
    eval_sources = heldout_sources(langs) if eval_sources is None else eval_sources
    train_sources = train_split_sources(langs) if train_sources is None else train_sources
    taskpool = make_taskpool(base_dir, langs, eval_tokens, window_length, eval_sources)
    settings = {
        "router_stage": {"steps": router_steps, "learning_rate": router_lr},
        "experts_stage": {"steps": experts_steps, "learning_rate": experts_lr},
        "batch_size": batch_size,
        "seq_len": seq_len,
        "train_tokens_per_language": train_tokens_per_language,
        "eval_tokens_per_language": eval_tokens,
        "window_length": window_length,
        "dtype": "float32",
        "languages": langs,
        "sources": {k: str(v) for k, v in eval_sources.items()},
        "experts": dict(experts),
    }
    if curve_every:
        settings["curve"] = {"every": curve_every, "eval_tokens": curve_eval_tokens}
    runs = referenced_run_log(
        out / summary, "runs", len(rows), settings, resume, taskpool, base_dir, experts
    )
    refs = runs.header["references"]
    run_one = functools.partial(_merge_train_evaluate, base_dir, experts, taskpool, refs)
    for i, row in enumerate(rows, 1):
        sources = {"train": row.get("train_sources", train_sources), "eval": eval_sources}
        compute = functools.partial(run_one, sources, settings, row)
        path, entries = row_path(run_dir, row), _row_entries(row)
        result = runs.run(path, compute, resume, settings=settings, params=row["params"], **entries)
        if result is not None:
            _log_run(f"[{i}/{len(rows)}] {_key(row)}", result)
    return runs.dump()


def _row_entries(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's optional entries that its result records (and resume compares)."""
    return {k: row[k] for k in ROW_ENTRIES if k in row}


def _log_run(prefix: str, result: Mapping[str, Any]) -> None:
    """One log line per finished run: English forgetting and gain kept at each point."""
    pts = result["points"]
    log.info(
        "%s: en %s, gain retained %s (merged -> router -> experts), %.0f s",
        prefix,
        " -> ".join(f"{100 * pts[p].get('forgetting_en', math.nan):+.2f}%" for p in POINTS),
        " -> ".join(f"{pts[p].get('gain_retained') or math.nan:.3f}" for p in POINTS),
        result["seconds"],
    )


def _train(
    model: Any,
    stage: str,
    row: Mapping[str, Any],
    base_dir: str,
    sources: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """One ``moe_ct_training`` stage (``router`` or ``experts``) on ``model`` with the row's
    seed and ``trainer`` parameters; returns the trained model, its per-step history, its
    held-out evaluations during training (``settings["curve"]``, else none) and the trainer's
    data plan (each source's share of every step)."""
    from fusion_bench_moect import MoECTTrainingAlgorithm

    stage_settings = settings[f"{stage}_stage"]
    steps = stage_settings["steps"]
    curve = settings.get("curve")
    if curve:
        extra = dict(
            eval_sources=dict(sources["eval"]),
            eval_every=curve["every"],
            eval_max_tokens_per_source=curve["eval_tokens"],
        )
    else:
        extra = {}
    params = dict(
        train_sources=sources["train"],
        stage=stage,
        max_steps=steps,
        learning_rate=stage_settings["learning_rate"],
        lr_scheduler="constant",
        batch_size=settings["batch_size"],
        seq_len=settings["seq_len"],
        max_tokens_per_source=settings["train_tokens_per_language"],
        seed=row["params"]["seed"],
        log_every=max(steps // 2, 1),
        **extra,
    )
    # the row's own trainer parameters win (a dense row trains its FFN in both stages)
    trainer = MoECTTrainingAlgorithm(**{**params, **row.get("trainer", {})})
    pool = make_pool(base_dir, {}, "float32", in_memory={"_pretrained_": model})
    trained = trainer.run(pool)
    keys = ("step", "loss", "lm_loss", "aux_loss", *STEP_METRICS, "bias_min", "bias_max")
    history = [{k: h[k] for k in keys if k in h} for h in trainer.history]
    return trained, history, [curve_point(e) for e in trainer.evaluations], trainer.data_plan


def _merge_train_evaluate(
    base_dir: str,
    experts: Mapping[str, str],
    taskpool: Any,
    refs: Mapping[str, Any],
    sources: Mapping[str, Any],
    settings: Mapping[str, Any],
    row: Mapping[str, Any],
) -> dict[str, Any]:
    """One run: merge with the row's parameters, then the two stages; metrics at each point."""
    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    t0 = time.perf_counter()
    seed = row["params"]["seed"]
    merged = {} if row.get("model") == "dense" else experts  # dense: the base alone
    model = OrthogonalMoECTMergingAlgorithm(**row["params"]).run(
        make_pool(base_dir, merged, "float32")
    )
    points: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for point in POINTS:
        if point != "merged":
            t1 = time.perf_counter()
            model, histories[point], curves[point], plans[point] = _train(
                model, point, row, base_dir, sources, settings
            )
            seconds[f"{point}_train"] = time.perf_counter() - t1
        report = taskpool.evaluate_model(model, label=f"{row['name']} seed {seed} {point}")
        points[point] = row_metrics(report, refs, list(experts))
    return {
        "index": row.get("index", 0),
        "name": row["name"],
        "group": row["group"],
        "params": dict(row["params"]),
        **_row_entries(row),
        "settings": settings,
        "points": points,
        "histories": histories,
        **({"curves": curves} if settings.get("curve") else {}),
        "data_plans": plans,
        "stage_seconds": seconds,
        "seconds": time.perf_counter() - t0,
    }
