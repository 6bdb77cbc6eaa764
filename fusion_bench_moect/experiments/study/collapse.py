"""Expert collapse under continued training, per router initialisation (``gate_mode``).

For every gate mode and seed: merge base + language experts with ``moe_ct_upcycling``
(the setting docs/study.md examines: ``u_shaped``, ``base_alpha`` 0.8, base expert as
anchor, ``router_aux_scale`` 1.1; the seed drives the router initialisation), then a
short ``moe_ct_training`` run on mixed-language text (train split of the Debian Reference
in English + every expert language), then the held-out evaluation. The training history
(``algo.history``: per-step CV, MaxVio, router entropy, dead experts, anchor share on the
training batch, measured before that step's update) gives balance over steps.

``hidden`` gates get a few prompts per expert: the first paragraphs of the **train**
split in the expert's language (English for the base expert).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.routing import HEADLINE_METRICS, STEP_METRICS

from .common import STUDY_MERGE, ensure_dir, make_pool, make_taskpool, specialisation

log = logging.getLogger(__name__)

GATE_MODES = ("orthogonal", "random", "uniform_random", "hidden")
HISTORY_KEYS = ("loss", "lm_loss", "aux_loss", *STEP_METRICS)
#: The fixed merge settings of every run.
MERGE_PARAMS: dict[str, Any] = STUDY_MERGE.pick(
    "architecture",
    "include_base_expert",
    "router_aux_scale",
    "moe_ct_mode",
    "alpha_strategy",
    "base_alpha",
    "experts_per_token",
)


def train_prompts(
    langs: Sequence[str], count: int = 4, max_chars: int = 300
) -> dict[str, list[str]]:
    """``count`` prompts per language: the first paragraphs (>= 80 characters) of the train split."""
    from fusion_bench_moect.eval.text import load_debian_reference

    prompts: dict[str, list[str]] = {}
    for lang in langs:
        found: list[str] = []
        for doc in load_debian_reference(lang, split="train"):
            for para in doc.text.split("\n\n"):
                if len(para) >= 80:
                    found.append(para[:max_chars])
                if len(found) >= count:
                    break
            if len(found) >= count:
                break
        prompts[lang] = found
    return prompts


def run_collapse(
    base_dir: str,
    experts: Mapping[str, str],
    out_dir: str | Path,
    gate_modes: Sequence[str] = GATE_MODES,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 20,
    batch_size: int = 2,
    seq_len: int = 128,
    learning_rate: float = 1e-4,
    stage: str = "experts",
    train_tokens_per_language: int = 20_000,
    eval_tokens: int = 1024,
    window_length: int = 256,
    resume: bool = False,
    eval_sources: Mapping[str, Any] | None = None,
    train_sources: Mapping[str, Any] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run every (gate mode, seed); write ``collapse.json`` in ``out_dir``.

    ``eval_sources``, ``train_sources`` and ``prompts`` (``{lang: [...]}``, ``en`` for the
    base expert) replace the Debian Reference defaults, e.g. for tests."""
    from fusion_bench_moect import MoECTTrainingAlgorithm, OrthogonalMoECTMergingAlgorithm

    out = ensure_dir(out_dir)
    run_dir = ensure_dir(out / "runs")
    langs = ["en", *[lang for lang in experts if lang != "en"]]
    taskpool = make_taskpool(base_dir, langs, eval_tokens, window_length, eval_sources)
    if train_sources is None:
        train_sources = {lang: {"debian_reference": lang, "split": "train"} for lang in langs}
    raw_prompts = dict(prompts) if prompts is not None else train_prompts(langs)
    prompts = {("_pretrained_" if k == "en" else k): v for k, v in raw_prompts.items()}
    settings = {
        "merge": MERGE_PARAMS,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "learning_rate": learning_rate,
        "stage": stage,
        "train_tokens_per_language": train_tokens_per_language,
        "eval_tokens_per_language": eval_tokens,
        "window_length": window_length,
        "languages": langs,
        "experts": dict(experts),
    }
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    total = len(gate_modes) * len(seeds)

    def dump() -> dict[str, Any]:
        data = {
            "settings": settings,
            "prompts": raw_prompts,
            "runs": sorted(runs, key=lambda r: (list(gate_modes).index(r["gate_mode"]), r["seed"])),
            "complete": len(runs) == total,
            "planned_runs": total,
            "seconds": time.perf_counter() - started,
        }
        (out / "collapse.json").write_text(json.dumps(data, indent=1))
        return data

    # seed-major order: a run cut short still has every gate mode for the first seeds
    for seed in seeds:
        for mode in gate_modes:
            path = run_dir / f"{mode}_seed{seed}.json"
            if resume and path.exists():
                saved = json.loads(path.read_text())
                if saved.get("settings") == settings:
                    runs.append(saved)
                    continue
            t0 = time.perf_counter()
            params = {**MERGE_PARAMS, "gate_mode": mode, "seed": seed}
            if mode in ("hidden", "cheap_embed"):
                params["prompts"] = prompts
            merged = OrthogonalMoECTMergingAlgorithm(**params).run(
                make_pool(base_dir, experts, "float32")
            )
            merge_s = time.perf_counter() - t0
            trainer = MoECTTrainingAlgorithm(
                train_sources=train_sources,
                stage=stage,
                max_steps=steps,
                learning_rate=learning_rate,
                lr_scheduler="constant",
                batch_size=batch_size,
                seq_len=seq_len,
                max_tokens_per_source=train_tokens_per_language,
                seed=seed,
                log_every=max(steps // 4, 1),
            )
            t1 = time.perf_counter()
            model = trainer.run(
                make_pool(base_dir, {}, "float32", in_memory={"_pretrained_": merged})
            )
            train_s = time.perf_counter() - t1
            report = taskpool.evaluate_model(model, label=f"{mode} seed {seed}")
            routing = report.get("routing") or {}
            overall = routing.get("overall") or {}
            record = (report.get("model") or {}).get("moe_ct") or {}
            result = {
                "gate_mode": mode,
                "seed": seed,
                "settings": settings,
                "history": [
                    {k: h.get(k) for k in ("step", *HISTORY_KEYS)} for h in trainer.history
                ],
                "eval": {
                    "perplexity": report["perplexity"],
                    "overall_perplexity": report["overall_perplexity"],
                    **{k: overall.get(k) for k in HEADLINE_METRICS},
                    **specialisation(routing.get("per_source_shares") or {}, record.get("experts")),
                    "per_source_shares": routing.get("per_source_shares"),
                    "experts": record.get("experts"),
                },
                "merge_seconds": merge_s,
                "train_seconds": train_s,
                "seconds": time.perf_counter() - t0,
            }
            path.write_text(json.dumps(result, indent=1))
            runs.append(result)
            log.info(
                "[%d/%d] %s seed %d: CV %.3f -> %.3f, eval ppl %.3f, %.0f s",
                len(runs),
                total,
                mode,
                seed,
                result["history"][0]["mean_cv"] or float("nan"),
                result["history"][-1]["mean_cv"] or float("nan"),
                report["overall_perplexity"],
                result["seconds"],
            )
            del model, merged, trainer
            dump()
    return dump()
