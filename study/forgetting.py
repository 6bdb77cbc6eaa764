"""Does the MoE forget, and how much English replay prevents it?

For every replay ratio and seed, two models train on the same weighted mixture of de/fr/es
with English replay (``replay`` of every step, ``moe_ct_training``'s per-source ``weight``):

* **moe**: the study's recommended MoE (``glm4_moe`` from the ``u_shaped@0.8`` merge of the
  base and the de/fr/es experts, base expert as frozen anchor, ``bias`` balancing, the one mode
  that balanced in the balancing section), a ``router`` stage then an ``experts`` stage;
* **dense**: the dense base with its FFN fine-tuned on the same windows for the same tokens
  (``router_steps`` then ``experts_steps`` steps, both at the experts stage's learning rate).
  It is the base upcycled into one expert, top-1: exactly the dense function (its logits are
  the base's), so ``moe_ct_training``'s experts stage trains the dense FFN with the MoE's data
  order, mixture, batch and schedule; written back into the dense architecture it gives the
  same logits (tested). FusionBench's ``FullFinetuneSFT`` is not used: it reads the pool's
  train datasets concatenated and shuffled by an unseeded loader (no weighted mixture, other
  windows) and evaluates nothing during training.

Both are evaluated on held-out text (the Debian Reference's held-out chapters in every
language: English in-domain; Debian's GPL-3: English out-of-domain, in no mixture) after the
merge, during training (``curve_every``) and after each stage. ``render`` turns the summary
(``forgetting.json``) into a section of docs/study.md with a verdict computed from the numbers.

Usage::

    python -m study --parts forgetting --forgetting-seeds 0,1 --forgetting-replay 0,0.1,0.25
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.plots import figure

from . import balancing, sections
from .balancing import STAGES, balancing_rows
from .common import mean_std, pm, table
from .grid import train_split_sources
from .report_training import trained_groups
from .trained import POINTS

REPLAY_RATIOS = (0.0, 0.10, 0.25)
MODELS = ("moe", "dense")
#: The MoE's balancing: the only mode that balanced in the balancing section.
BALANCING = "bias"
#: The dense model as an MoE: the base alone, one expert, top-1 (the dense function).
DENSE_PARAMS = {"architecture": "mixtral", "num_experts": 1, "experts_per_token": 1}
#: "Keeps English": out-of-domain English perplexity at most this much above the dense base's.
KEEP_BAR = 0.01
REPLAY_SOURCE = "en_replay"
SECTION = sections.Section("forgetting")
#: Routing columns, blank for the dense model (one expert routes nothing).
ROUTING = ("mean_max_violation", "mean_cv", "dead_experts", "anchor_share_en")


def replay_mixture(
    new: Mapping[str, Mapping[str, Any]], replay_source: Mapping[str, Any], replay: float
) -> dict[str, dict[str, Any]]:
    """``new`` sources sharing ``1 - replay`` of every step equally, plus ``replay_source``
    (as ``en_replay``) with ``replay`` (left out at 0): weights that sum to 1."""
    if not 0.0 <= replay < 1.0 or not new:
        raise ValueError(f"replay must be in [0, 1) with new sources, got {replay!r}.")
    share = round((1.0 - replay) / len(new), 9)
    mixture = {name: {**spec, "weight": share} for name, spec in new.items()}
    if replay > 0:
        mixture[REPLAY_SOURCE] = {**replay_source, "weight": replay}
    return mixture


def debian_mixture(langs: Sequence[str], replay: float) -> dict[str, dict[str, Any]]:
    """The Debian Reference's train split of ``langs`` (not English) with English replay."""
    new = train_split_sources([lang for lang in langs if lang != "en"])
    return replay_mixture(new, train_split_sources(["en"])["en"], replay)


def forgetting_rows(
    seeds: Sequence[int],
    mixture: Callable[[float], Mapping[str, Any]],
    replays: Sequence[float] = REPLAY_RATIOS,
    models: Sequence[str] = MODELS,
    experts_lr: float = 1e-4,
) -> list[dict[str, Any]]:
    """One run per (seed, replay, model), seed-major (a run cut short has whole seeds);
    ``mixture(replay)`` is its training mixture."""
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"Unknown models {sorted(unknown)}; valid: {', '.join(MODELS)}.")
    rows = []
    for seed in seeds:
        moe = balancing_rows([seed], [BALANCING])[0]
        dense = {
            "params": {**DENSE_PARAMS, "seed": seed},
            # its FFN trains in both stages, at the experts' rate; one expert needs no balancing
            "trainer": {"stage": "experts", "learning_rate": experts_lr, "balancing": "none"},
        }
        for replay in replays:
            for model in models:
                rows.append(
                    {
                        **(moe if model == "moe" else dense),
                        "name": f"{model} replay{round(100 * replay)}",
                        "group": "forgetting",
                        "model": model,
                        "replay": replay,
                        "train_sources": dict(mixture(replay)),
                        "index": len(rows),
                    }
                )
    return rows


# ------------------------------------------------------------------ measures
def measures(point: Mapping[str, Any], langs: Sequence[str]) -> dict[str, Any]:
    """One evaluation point's numbers: English (in- and out-of-domain) and mean new-language
    perplexity change against the dense base, gain kept, balance, the anchor's English share."""
    plasticity, _ = mean_std([point.get(f"{lang}_vs_base") for lang in _new(langs)])
    return {
        "en": point.get("forgetting_en"),
        "en_ood": point.get("forgetting_en_gpl3"),
        "plasticity": plasticity,
        "gain_retained": point.get("gain_retained"),
        **{k: point.get(k) for k in ROUTING},
    }


def _new(langs: Sequence[str]) -> list[str]:
    """The languages the models learn (all but English)."""
    return [lang for lang in langs if lang != "en"]


def groups(summary: Mapping[str, Any]) -> list[tuple[str, float, list[dict[str, Any]]]]:
    """(model, replay, runs) per row name, models in ``MODELS`` order, then by replay."""
    found = [
        (runs[0]["model"], runs[0]["replay"], runs) for runs in trained_groups(summary).values()
    ]
    return sorted(found, key=lambda g: (MODELS.index(g[0]), g[1]))


def after(
    summary: Mapping[str, Any], std: bool = False
) -> dict[tuple[str, float], dict[str, float | None]]:
    """Mean (``std``: standard deviation) over seeds of every measure after the experts
    stage, per (model, replay)."""
    langs = summary["settings"]["languages"]
    out = {}
    for model, replay, runs in groups(summary):
        per_run = [measures(r["points"]["experts"], langs) for r in runs]
        out[(model, replay)] = {k: mean_std([m[k] for m in per_run])[std] for k in per_run[0]}
    return out


def _keeps(changes: Mapping[float, float | None]) -> float | None:
    """The smallest replay ratio whose out-of-domain English change is within ``KEEP_BAR``."""
    kept = [r for r, c in sorted(changes.items()) if c is not None and c <= KEEP_BAR]
    return kept[0] if kept else None


def _describe(name: str, changes: Mapping[float, float | None]) -> str:
    ratio, first = _keeps(changes), min(changes)
    if ratio is None:
        best = min(c for c in changes.values() if c is not None)
        return f"the {name} forgets it at every replay ratio tried (at best {100 * best:+.1f}%)"
    if ratio == first:
        return f"the {name} keeps it at {_pct(ratio)} replay ({100 * changes[ratio]:+.1f}%)"
    return (
        f"the {name} needs {_pct(ratio)} replay to keep it ({100 * changes[first]:+.1f}% at "
        f"{_pct(first)}, {100 * changes[ratio]:+.1f}% at {_pct(ratio)})"
    )


def verdict(summary: Mapping[str, Any]) -> str:
    """The section's one-sentence answer, computed from the means after the experts stage."""
    means = after(summary)
    models = [m for m in MODELS if any(k[0] == m for k in means)]
    ood = {m: {r: v["en_ood"] for (mm, r), v in means.items() if mm == m} for m in models}
    if any(v is None for changes in ood.values() for v in changes.values()):
        return "No verdict: the runs have no out-of-domain English (GPL-3) evaluation."
    names = {"moe": "MoE", "dense": "dense fine-tune"}
    said = "; ".join(_describe(names[m], ood[m]) for m in models)
    ratio = _keeps(ood[models[0]])
    ratio = max(ood[models[0]]) if ratio is None else ratio
    first = min(ood[models[0]])

    def cost(m: str) -> str:
        at = [means.get((m, r), {}).get("plasticity") for r in (ratio, first)]
        if at[0] is None:
            return f"{names[m]} n/a"
        text = f"{names[m]} {100 * at[0]:+.1f}%"
        if ratio != first and at[1] is not None:
            text += f" ({100 * at[1]:+.1f}% at {_pct(first)})"
        return text

    seeds = len(groups(summary)[0][2])
    new = "/".join(_new(summary["settings"]["languages"]))
    return (
        f"Out-of-domain English perplexity against the dense base after training (mean of "
        f"{seeds} seed{'s' if seeds > 1 else ''}; kept = within {100 * KEEP_BAR:g}%): {said}; "
        f"at {_pct(ratio)} replay {new} perplexity moves {', '.join(map(cost, models))}."
    )


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g}%"


# ------------------------------------------------------------------ report
def compact(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The record kept beside the document (``docs/study/forgetting.json``), cut as the
    balancing section's: each run's histories to their last step."""
    return balancing.compact(summary)


def _cells(model: str, runs: Sequence[Mapping[str, Any]], point: str, langs: Sequence[str]):
    per_run = [measures(r["points"][point], langs) for r in runs]

    def cell(key: str, pct: bool = False, digits: int = 3) -> str:
        if model == "dense" and key in ROUTING:
            return "–"
        return pm([m[key] for m in per_run], digits=digits, pct=pct)

    return cell


def results_table(summary: Mapping[str, Any]) -> list[str]:
    """After the experts stage, per model and replay ratio: mean ± std over seeds."""
    langs = summary["settings"]["languages"]
    rows = []
    for model, replay, runs in groups(summary):
        cell = _cells(model, runs, "experts", langs)
        rows.append(
            [
                model,
                _pct(replay),
                str(len(runs)),
                cell("en_ood", pct=True),
                cell("en", pct=True),
                cell("plasticity", pct=True),
                cell("gain_retained"),
                cell("anchor_share_en"),
                cell("mean_max_violation"),
                cell("mean_cv"),
                cell("dead_experts", digits=1),
            ]
        )
    new = "/".join(_new(langs))
    header = ["model", "English replay", "seeds", "English out-of-domain (GPL-3) vs base"]
    header += ["English in-domain vs base", f"{new} vs base (mean)", f"gain kept ({new})"]
    return table([*header, "anchor share of English", "MaxVio", "CV", "dead experts"], rows)


def perplexity_table(summary: Mapping[str, Any]) -> list[str]:
    """Held-out perplexity per text: the dense base, then every model after training."""
    texts = list(summary["settings"]["sources"])
    base = summary["references"]["base"]["perplexity"]
    rows = [["dense base (before training)", "", *(pm([base.get(t)]) for t in texts)]]
    for model, replay, runs in groups(summary):
        points = [r["points"]["experts"] for r in runs]
        rows.append(
            [model, _pct(replay), *(pm([p.get(f"ppl_{t}") for p in points]) for t in texts)]
        )
    return table(["model", "English replay", *(f"ppl {t}" for t in texts)], rows)


def course_table(summary: Mapping[str, Any]) -> list[str]:
    """Out-of-domain English and new-language change at each point (merged, after the
    router stage, after the experts stage), mean over seeds."""
    langs = summary["settings"]["languages"]
    rows = []
    for model, replay, runs in groups(summary):
        ood, new = [], []
        for point in POINTS:
            cell = _cells(model, runs, point, langs)
            ood.append(cell("en_ood", pct=True))
            new.append(cell("plasticity", pct=True))
        rows.append([model, _pct(replay), " → ".join(ood), " → ".join(new)])
    header = ["model", "English replay", "English out-of-domain: merged → router → experts"]
    new = "/".join(_new(langs))
    return table([*header, f"{new} (mean): merged → router → experts"], rows)


def _mixtures(summary: Mapping[str, Any]) -> str:
    """Each replay ratio's share of every step per source (the trainer's data plan of the
    experts stage), and what the sources read."""
    seen: dict[float, str] = {}
    debian = True
    for _, replay, runs in groups(summary):
        mixture = runs[0].get("train_sources", {})
        debian = debian and all("debian_reference" in v for v in mixture.values())
        plan = runs[0]["data_plans"]["experts"]
        seen.setdefault(replay, ", ".join(f"{k} {v['share']:.3g}" for k, v in plan.items()))
    text = "; ".join(f"replay {_pct(r)}: {w}" for r, w in seen.items())
    return text + (", each the Debian Reference's train split in its language" if debian else "")


def render(summary: Mapping[str, Any], img_rel: str, command: str) -> str:
    """The docs/study.md section of a finished ``forgetting.json``."""
    s = summary["settings"]
    r, e = s["router_stage"], s["experts_stage"]
    lines = [
        SECTION.begin,
        "## Does the MoE forget, and how much English replay prevents it?",
        "",
        f"**Verdict.** {verdict(summary)}",
        "",
        f"MoE: `glm4_moe` from the study's `u_shaped@0.8` merge (base expert as frozen anchor), "
        f"`{BALANCING}` balancing, {r['steps']} router-stage steps (lr {r['learning_rate']:g}) "
        f"then {e['steps']} experts-stage steps (lr {e['learning_rate']:g}). Dense: the base's FFN "
        f"fine-tuned on the same windows ({r['steps']} + {e['steps']} steps, lr "
        f"{e['learning_rate']:g}; the base as a one-expert top-1 MoE, the dense function, through "
        f"the same trainer). Batch {s['batch_size']} x {s['seq_len']} tokens, constant LR, at most "
        f"{s['train_tokens_per_language']} tokens read per source; weighted mixtures, as shares "
        f"of every step ({_mixtures(summary)}). Evaluated on "
        f"{s['eval_tokens_per_language']} held-out tokens per text; changes are perplexity "
        "against the dense base (> 0 = worse), mean ± std over seeds.",
        "",
        *results_table(summary),
        "",
        *perplexity_table(summary),
        "",
        *course_table(summary),
        "",
        f"![forgetting vs plasticity]({img_rel}/forgetting.png)",
        "",
        f"Reproduce: `{command}`",
        SECTION.end,
    ]
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: Path) -> Path:
    """Forgetting (out-of-domain and in-domain English) against plasticity (mean new-language
    change) after training, one line per model through its replay ratios; and out-of-domain
    English perplexity during training."""
    means, stds = after(summary), after(summary, std=True)
    panels = (("en_ood", "English out-of-domain (GPL-3)"), ("en", "English in-domain"))
    new = "/".join(_new(summary["settings"]["languages"]))
    with figure(path, dpi=110, ncols=3, figsize=(16, 4.8)) as (fig, axes):
        for ax, (key, title) in zip(axes, panels, strict=False):
            for model, style in zip(MODELS, ("o-", "s--"), strict=True):
                keys = sorted(k for k in means if k[0] == model)
                xs, ys = ([100 * _num(means[k][m]) for k in keys] for m in ("plasticity", key))
                xerr, yerr = ([100 * _num(stds[k][m]) for k in keys] for m in ("plasticity", key))
                ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt=style, capsize=3, label=model)
                for (_, replay), x, y in zip(keys, xs, ys, strict=True):
                    ax.annotate(_pct(replay), (x, y), textcoords="offset points", xytext=(4, 4))
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel(f"{new} perplexity vs base (%)  [< 0 = learned: plasticity]")
            ax.set_ylabel(f"{title} vs base (%)  [> 0 = forgetting]")
            ax.legend()
        _plot_curves(summary, axes[2])
        fig.suptitle(
            "Forgetting vs plasticity per English replay ratio, MoE vs dense (mean ± std over seeds)"
        )
    return path


def _plot_curves(summary: Mapping[str, Any], ax: Any) -> None:
    """Out-of-domain English perplexity during training, mean over seeds per group."""
    offset = summary["settings"]["router_stage"]["steps"]
    colors = {r: f"C{i}" for i, r in enumerate(sorted({g[1] for g in groups(summary)}))}
    for model, replay, runs in groups(summary):
        steps: dict[int, list[float]] = {}
        for run in runs:
            for stage, shift in zip(STAGES, (0, offset), strict=True):
                for p in run.get("curves", {}).get(stage, []):
                    value = (p.get("perplexity") or {}).get("en_gpl3")
                    steps.setdefault(p["step"] + shift, []).append(_num(value))
        xs = sorted(steps)
        ys = [sum(steps[x]) / len(steps[x]) for x in xs]
        style = "-" if model == "moe" else "--"
        ax.plot(xs, ys, style, color=colors[replay], label=f"{model} replay {_pct(replay)}")
    ax.axvline(offset, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step (router stage, then experts stage)")
    ax.set_ylabel("English out-of-domain perplexity (held-out)")
    ax.legend(fontsize=7)


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)
