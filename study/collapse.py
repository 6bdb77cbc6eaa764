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

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.routing import HEADLINE_METRICS, STEP_METRICS

from .common import STUDY_MERGE, curve_point, ensure_dir, make_pool, make_taskpool, specialisation
from .grid import train_split_sources
from .runs import RunLog

log = logging.getLogger(__name__)

GATE_MODES = ("orthogonal", "random", "uniform_random", "hidden")
#: The gate modes the claim compares (the default of a full run).
CLAIM_GATE_MODES = ("orthogonal", "random")
#: Load-balancing loss on (the trainer's default) and off (collapse is likelier).
AUX_LOSS_COEFS = (0.01, 0.0)
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
    from fusion_bench_moect.data.text import load_debian_reference

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
    aux_loss_coefs: Sequence[float] = (0.01,),
    train_tokens_per_language: int = 20_000,
    eval_tokens: int = 1024,
    curve_eval_tokens: int = 256,
    curve_points: int = 4,
    window_length: int = 256,
    resume: bool = False,
    eval_sources: Mapping[str, Any] | None = None,
    train_sources: Mapping[str, Any] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run every (gate mode, load-balancing loss coefficient, seed); write
    ``collapse.json`` in ``out_dir``.

    ``eval_sources``, ``train_sources`` and ``prompts`` (``{lang: [...]}``, ``en`` for the
    base expert) replace the Debian Reference defaults, e.g. for tests."""
    langs = ["en", *[lang for lang in experts if lang != "en"]]
    if eval_sources is None:
        eval_sources = {lang: {"debian_reference": lang, "split": "heldout"} for lang in langs}
    taskpool = make_taskpool(base_dir, langs, eval_tokens, window_length, eval_sources)
    train_sources, raw_prompts = _training_inputs(langs, train_sources, prompts)
    coefs = [float(c) for c in aux_loss_coefs]
    settings = {
        "merge": MERGE_PARAMS,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "learning_rate": learning_rate,
        "stage": stage,
        "aux_loss_coefs": coefs,
        "train_tokens_per_language": train_tokens_per_language,
        "eval_tokens_per_language": eval_tokens,
        "curve_eval_tokens_per_language": curve_eval_tokens,
        "curve_eval_every": max(steps // max(curve_points, 1), 1),
        "window_length": window_length,
        "languages": langs,
        "experts": dict(experts),
    }
    inputs = _RunInputs(base_dir, experts, taskpool, train_sources, eval_sources, raw_prompts)
    run_one = functools.partial(_merge_train_evaluate, inputs, settings)
    header = {"settings": settings, "prompts": raw_prompts}
    return _run_all(ensure_dir(out_dir), header, list(gate_modes), coefs, seeds, resume, run_one)


@dataclass(frozen=True)
class _RunInputs:
    """What every run of one invocation shares: models, evaluation, training text, prompts
    (``{lang: [...]}``, ``en`` for the base expert)."""

    base_dir: str
    experts: Mapping[str, str]
    taskpool: Any
    train_sources: Mapping[str, Any]
    eval_sources: Mapping[str, Any]
    prompts: Mapping[str, Sequence[str]]


def _run_all(
    out: Path,
    header: dict[str, Any],
    modes: Sequence[str],
    coefs: Sequence[float],
    seeds: Sequence[int],
    resume: bool,
    run_one: Callable[[str, float, int], dict[str, Any]],
) -> dict[str, Any]:
    """Every (gate mode, coefficient, seed) run, resumed or done now; the summary."""
    runs = RunLog(
        out / "collapse.json",
        header,
        "runs",
        len(modes) * len(seeds) * len(coefs),
        order=_run_order(modes, coefs),
    )
    run_dir = ensure_dir(out / "runs")
    # seed-major order: a run cut short still has every gate mode for the first seeds
    for seed in seeds:
        for coef in coefs:
            for mode in modes:
                path = run_dir / f"{mode}_aux{coef:g}_seed{seed}.json"
                _run_or_resume(runs, path, (mode, coef), seed, resume, run_one)
    return runs.dump()


def _run_order(
    modes: Sequence[str], coefs: Sequence[float]
) -> Callable[[dict[str, Any]], tuple[int, int, int]]:
    """Sort key of the summary's runs: gate mode (in ``modes`` order), loss coefficient
    (in ``coefs`` order), then seed."""
    return lambda run: (
        list(modes).index(run["gate_mode"]),
        list(coefs).index(run.get("aux_loss_coef", 0.01)),
        run["seed"],
    )


def _training_inputs(
    langs: Sequence[str],
    train_sources: Mapping[str, Any] | None,
    prompts: Mapping[str, Sequence[str]] | None,
) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The training text per language and the ``hidden`` gates' prompts (``{lang: [...]}``),
    the train split of the Debian Reference unless given."""
    if train_sources is None:
        train_sources = train_split_sources(langs)
    return train_sources, dict(prompts) if prompts is not None else train_prompts(langs)


def _run_or_resume(
    runs: RunLog,
    path: Path,
    variant: tuple[str, float],
    seed: int,
    resume: bool,
    run_one: Callable[[str, float, int], dict[str, Any]],
) -> None:
    """Keep the run saved at ``path`` (``resume``, same settings) or do it now."""
    mode, coef = variant
    compute = functools.partial(run_one, mode, coef, seed)
    result = runs.run(path, compute, resume, settings=runs.header["settings"])
    if result is None:
        return
    log.info(
        "[%d/%d] %s aux %g seed %d: CV %.3f -> %.3f, eval ppl %.3f, %.0f s",
        len(runs.results),
        runs.planned,
        mode,
        coef,
        seed,
        result["history"][0]["mean_cv"] or float("nan"),
        result["history"][-1]["mean_cv"] or float("nan"),
        result["eval"]["overall_perplexity"],
        result["seconds"],
    )


def _merge_train_evaluate(
    inputs: _RunInputs, settings: Mapping[str, Any], mode: str, aux_loss_coef: float, seed: int
) -> dict[str, Any]:
    """One run: merge with ``gate_mode`` ``mode``, train ``settings["steps"]`` steps with
    load-balancing loss coefficient ``aux_loss_coef``, evaluate."""
    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    t0 = time.perf_counter()
    params = {**MERGE_PARAMS, "gate_mode": mode, "seed": seed}
    if mode in ("hidden", "cheap_embed"):
        params["prompts"] = {
            ("_pretrained_" if k == "en" else k): v for k, v in inputs.prompts.items()
        }
    pool = make_pool(inputs.base_dir, inputs.experts, "float32")
    merged = OrthogonalMoECTMergingAlgorithm(**params).run(pool)
    merge_s = time.perf_counter() - t0
    trainer = _trainer(inputs, settings, aux_loss_coef, seed)
    t1 = time.perf_counter()
    model = trainer.run(
        make_pool(inputs.base_dir, {}, "float32", in_memory={"_pretrained_": merged})
    )
    train_s = time.perf_counter() - t1
    label = f"{mode} aux {aux_loss_coef:g} seed {seed}"
    report = inputs.taskpool.evaluate_model(model, label=label)
    routing = report.get("routing") or {}
    overall = routing.get("overall") or {}
    record = (report.get("model") or {}).get("moe_ct") or {}
    return {
        "gate_mode": mode,
        "aux_loss_coef": aux_loss_coef,
        "seed": seed,
        "settings": settings,
        "history": [{k: h.get(k) for k in ("step", *HISTORY_KEYS)} for h in trainer.history],
        "curve": [curve_point(e, record.get("experts")) for e in trainer.evaluations],
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


def _trainer(
    inputs: _RunInputs, settings: Mapping[str, Any], aux_loss_coef: float, seed: int
) -> Any:
    """The ``moe_ct_training`` algorithm of one run (constant learning rate), evaluating
    held-out routing during training for the specialisation curve."""
    from fusion_bench_moect import MoECTTrainingAlgorithm

    steps = settings["steps"]
    return MoECTTrainingAlgorithm(
        train_sources=inputs.train_sources,
        stage=settings["stage"],
        max_steps=steps,
        learning_rate=settings["learning_rate"],
        lr_scheduler="constant",
        router_aux_loss_coef=aux_loss_coef,
        batch_size=settings["batch_size"],
        seq_len=settings["seq_len"],
        max_tokens_per_source=settings["train_tokens_per_language"],
        seed=seed,
        log_every=max(steps // 4, 1),
        eval_sources=inputs.eval_sources,
        eval_every=settings["curve_eval_every"],
        eval_max_tokens_per_source=settings["curve_eval_tokens_per_language"],
    )


def combine_runs(
    collapse: Mapping[str, Any] | None, extra: Sequence[Path]
) -> dict[str, Any] | None:
    """``collapse`` with the runs of the ``extra`` summaries added (a run of the same gate
    mode, loss coefficient and seed is kept once, the first seen); each extra summary must
    share the merge and training settings but for the lists of modes and coefficients."""
    import json

    def same(settings: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "aux_loss_coefs"}

    combined = dict(collapse) if collapse else None
    for path in extra:
        other = json.loads(Path(path).read_text())
        if combined is None:
            combined = dict(other)
            continue
        if same(other["settings"]) != same(combined["settings"]):
            raise ValueError(
                f"{path}: its collapse runs used other settings than {combined['settings']}; "
                "only the gate modes and loss coefficients may differ."
            )
        seen = {(r["gate_mode"], r.get("aux_loss_coef"), r["seed"]) for r in combined["runs"]}
        added = [
            r
            for r in other["runs"]
            if (r["gate_mode"], r.get("aux_loss_coef"), r["seed"]) not in seen
        ]
        combined["runs"] = [*combined["runs"], *added]
        combined["planned_runs"] = combined.get("planned_runs", 0) + other.get("planned_runs", 0)
        combined["complete"] = bool(combined.get("complete")) and bool(other.get("complete"))
    return combined
