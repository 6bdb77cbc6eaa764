"""Tables, plots and the generated part of ``docs/study.md``.

The hand-written parts of the document (question, setup, verdicts) stay as they are; the
block between ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` is replaced by
fresh tables on every run. PNG/CSV/JSON go to the image folder (``docs/study/``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.plots import figure, pyplot

from .common import ensure_dir, fmt, mean_std, pm, table
from .report_training import (
    collapse_groups,
    curve_section,
    plot_curves,
    plot_sweep,
    plot_trained,
    sweep_rows,
    sweep_section,
    trained_section,
)

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"

CLAIM_ROWS = ("off", "constant@0.8", "u_shaped@0.8")
#: English texts of the forgetting bar, and the bar (perplexity vs the base).
ENGLISH_TEXTS = ("en", "en_gpl3")
FORGETTING_BAR = 0.15
AUX_PAIRS = (("u_shaped@0.8", "u_shaped@0.8 aux1.0"), ("constant@0.8", "constant@0.8 aux1.0"))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"


def _by_name(grid: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in grid.get("rows", []):
        out.setdefault(row["name"], []).append(row)
    return out


# ------------------------------------------------------------------ tables
def experts_section(markers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not markers:
        return []
    rows = []
    for lang, m in markers.items():
        s = m["settings"]
        rows.append(
            [
                lang,
                f"{s['steps']} x {s['batch_size']} x {s['seq_len']}",
                f"{s['learning_rate']:g}",
                s["train_target"],
                fmt(m.get("first_loss")),
                fmt(m.get("last10_loss")),
                fmt(m["heldout_perplexity_base"]),
                fmt(m["heldout_perplexity_expert"]),
                _pct(m["heldout_perplexity_change"]),
                *[_pct((m.get("english_forgetting") or {}).get(k)) for k in ENGLISH_TEXTS],
                f"{m['seconds']:.0f}",
            ]
        )
    return [
        "### Language experts",
        "",
        *table(
            [
                "expert",
                "steps x batch x seq",
                "lr",
                "trained",
                "first loss",
                "last-10 loss",
                "held-out ppl base",
                "held-out ppl expert",
                "change",
                "English (Debian Ref.) vs base",
                "English out-of-domain (GPL-3) vs base",
                "seconds",
            ],
            rows,
        ),
        "",
        "(Held-out perplexity of the expert's own language and English forgetting of the dense "
        "expert, measured at build time, bf16 expert, "
        f"{next(iter(markers.values()))['heldout_tokens']} tokens per text. Bar: each expert "
        f"at least {100 * FORGETTING_BAR:.0f}% worse than the base on both English texts "
        f"({_bar_verdict(markers)}).)",
        "",
    ]


def _bar_verdict(markers: Mapping[str, Mapping[str, Any]]) -> str:
    forgetting = [(m.get("english_forgetting") or {}) for m in markers.values()]
    met = all(f.get(k, -1.0) >= FORGETTING_BAR for f in forgetting for k in ENGLISH_TEXTS)
    return "met by every expert" if met else "**not met**"


def references_section(grid: Mapping[str, Any]) -> list[str]:
    refs = grid.get("references") or {}
    langs = list(next(iter(refs.values()))["perplexity"]) if refs else []
    rows = [[name, *[fmt(r["perplexity"].get(lang)) for lang in langs]] for name, r in refs.items()]
    return [
        "### Dense references (held-out perplexity)",
        "",
        *table(["model", *langs], rows),
        "",
    ]


def _grid_row_cells(row: Mapping[str, Any], langs: Sequence[str]) -> list[str]:
    m = row["metrics"]
    p = row["params"]
    cells = [
        row["name"],
        p["architecture"],
        fmt(p["include_base_expert"]),
        fmt(float(p["router_aux_scale"]), 2),
        str(p["seed"]),
        fmt(m.get("ppl_en")),
        _pct(m.get("forgetting_en")),
    ]
    if "forgetting_en_gpl3" in m:
        cells += [_pct(m.get("forgetting_en_gpl3"))]
    for lang in langs:
        if lang == "en":
            continue
        cells += [fmt(m.get(f"ppl_{lang}")), _pct(m.get(f"{lang}_vs_expert"))]
    cells += [
        fmt(m.get("gain_retained")),
        fmt(m.get("mean_anchor_share")),
        fmt(m.get("anchor_share_en")),
        fmt(m.get("specialisation")),
        fmt(m.get("mean_cv")),
        fmt(m.get("mean_max_violation")),
        fmt(m.get("dead_experts")),
    ]
    return cells


def grid_section(grid: Mapping[str, Any]) -> list[str]:
    langs = grid["settings"]["languages"]
    header = ["row", "arch", "base expert", "aux", "seed", "ppl en", "en vs base"]
    if any("forgetting_en_gpl3" in r["metrics"] for r in grid.get("rows", [])):
        header += ["GPL-3 vs base"]
    for lang in langs:
        if lang != "en":
            header += [f"ppl {lang}", f"{lang} vs expert"]
    header += [
        "gain kept",
        "anchor share",
        "anchor share (en)",
        "specialisation",
        "CV",
        "MaxVio",
        "dead",
    ]
    lines = []
    for group, title in (
        ("main", "Main grid: strategy x base_alpha (Mixtral, base expert, aux 1.1)"),
        ("ablation", "One-factor ablations around u_shaped@0.8 and constant@0.8"),
    ):
        rows = [r for r in grid.get("rows", []) if r["group"] == group]
        if rows:
            lines += [
                f"### {title}",
                "",
                *table(header, [_grid_row_cells(r, langs) for r in rows]),
                "",
            ]
    return lines


def claims_section(
    grid: Mapping[str, Any],
    collapse: Mapping[str, Any] | None,
    trained: Mapping[str, Any] | None = None,
) -> list[str]:
    by = _by_name(grid)
    lines = _claim2_lines(by) + trained_section(trained or {})
    lines += _claim3_lines(by, grid) + sweep_section(by)
    if collapse:
        lines += collapse_section(collapse)
    return lines


def _claim2_lines(by: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    lines: list[str] = []
    rows = []
    for name in CLAIM_ROWS:
        reps = by.get(name, [])
        if not reps:
            continue
        rows.append(
            [
                name,
                str(len(reps)),
                pm([r["metrics"].get("forgetting_en") for r in reps], pct=True),
                pm([r["metrics"].get("forgetting_en_gpl3") for r in reps], pct=True),
                pm([r["metrics"].get("gain_retained") for r in reps]),
                pm([r["metrics"].get("mean_anchor_share") for r in reps]),
            ]
        )
    if rows:
        lines += [
            "### Claim 2: forgetting vs plasticity (mean ± std over router seeds)",
            "",
            *table(
                [
                    "row",
                    "seeds",
                    "English (Debian Ref.) vs dense base",
                    "English out-of-domain (GPL-3) vs base",
                    "gain kept (de/fr/es)",
                    "anchor share",
                ],
                rows,
            ),
            "",
        ]
    return lines


def _aux_pair_row(setting: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    """One Claim-3 row: the aux-1.1 rows ``a`` against the aux-1.0 rows ``b``, paired by seed."""
    seeds_a = {r["params"]["seed"]: r for r in a}
    seeds_b = {r["params"]["seed"]: r for r in b}
    common = sorted(set(seeds_a) & set(seeds_b))
    diffs = [
        seeds_a[s]["metrics"]["mean_anchor_share"] - seeds_b[s]["metrics"]["mean_anchor_share"]
        for s in common
        if seeds_a[s]["metrics"].get("mean_anchor_share") is not None
        and seeds_b[s]["metrics"].get("mean_anchor_share") is not None
    ]
    en_diffs = [
        seeds_a[s]["metrics"]["forgetting_en"] - seeds_b[s]["metrics"]["forgetting_en"]
        for s in common
    ]
    gain_diffs = [
        seeds_a[s]["metrics"]["gain_retained"] - seeds_b[s]["metrics"]["gain_retained"]
        for s in common
        if seeds_a[s]["metrics"].get("gain_retained") is not None
        and seeds_b[s]["metrics"].get("gain_retained") is not None
    ]
    return [
        setting,
        str(len(common)),
        pm([seeds_b[s]["metrics"].get("mean_anchor_share") for s in common]),
        pm([seeds_a[s]["metrics"].get("mean_anchor_share") for s in common]),
        pm(diffs, 4),
        pm([seeds_b[s]["metrics"].get("anchor_share_en") for s in common]),
        pm([seeds_a[s]["metrics"].get("anchor_share_en") for s in common]),
        pm(en_diffs, pct=True),
        pm(gain_diffs),
    ]


def _claim3_lines(by: Mapping[str, list[dict[str, Any]]], grid: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    rows = [
        _aux_pair_row(with_aux.split(" ")[0], by[with_aux], by[without])
        for with_aux, without in AUX_PAIRS
        if by.get(with_aux) and by.get(without)
    ]
    if rows:
        anchor_bal = next(
            (r["metrics"].get("anchor_balanced_share") for r in grid.get("rows", [])), None
        )
        lines += [
            "### Claim 3: router_aux_scale 1.0 vs 1.1 (paired by router seed)",
            "",
            *table(
                [
                    "setting",
                    "seeds",
                    "anchor share aux 1.0",
                    "anchor share aux 1.1",
                    "difference (paired)",
                    "anchor share on en, aux 1.0",
                    "on en, aux 1.1",
                    "English ppl change 1.1 vs 1.0",
                    "gain kept change 1.1 vs 1.0",
                ],
                rows,
            ),
            "",
            f"(Balanced anchor share = {fmt(anchor_bal)}: the anchor is 1 of the routed experts.)",
            "",
        ]
    return lines


def _last(history: Sequence[Mapping[str, Any]], key: str, n: int = 5) -> float | None:
    vals = [h[key] for h in history[-n:] if h.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def collapse_section(collapse: Mapping[str, Any]) -> list[str]:
    modes = collapse_groups(collapse)
    s = collapse["settings"]
    rows = []
    for mode, runs in modes.items():
        h = [r["history"] for r in runs]
        rows.append(
            [
                mode,
                str(len(runs)),
                pm([x[0].get("mean_cv") for x in h]),
                pm([_last(x, "mean_cv") for x in h]),
                pm([_last(x, "mean_max_violation") for x in h]),
                pm([_last(x, "mean_router_entropy") for x in h]),
                pm([_last(x, "dead_experts") for x in h], 1),
                pm([_last(x, "mean_anchor_share") for x in h]),
                pm([r["eval"].get("mean_cv") for r in runs]),
                pm([r["eval"].get("dead_experts") for r in runs], 1),
                pm([r["eval"].get("specialisation") for r in runs]),
                pm([r["eval"].get("overall_perplexity") for r in runs]),
            ]
        )
    return [
        "### Claim 1: expert collapse under continued training, per gate mode and "
        "load-balancing loss (mean ± std over seeds)",
        "",
        f"`moe_ct_training` stage `{s['stage']}`, {s['steps']} steps x {s['batch_size']} x "
        f"{s['seq_len']} tokens, constant lr {s['learning_rate']:g}, mixed "
        f"{'/'.join(s['languages'])} "
        "train text; merge = u_shaped@0.8, base expert, aux 1.1. Training-batch metrics at "
        "step 1 (before any update) and averaged over the last 5 steps; held-out metrics "
        f"after training ({s['eval_tokens_per_language']} tokens per language).",
        "",
        *table(
            [
                "gate mode, aux loss",
                "seeds",
                "CV step 1",
                "CV last 5",
                "MaxVio last 5",
                "router H last 5",
                "dead last 5",
                "anchor share last 5",
                "held-out CV",
                "held-out dead",
                "held-out specialisation",
                "held-out ppl (all)",
            ],
            rows,
        ),
        "",
        *curve_section(collapse),
    ]


# ------------------------------------------------------------------- plots
def plot_tradeoff(grid: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    panels = [("forgetting_en", "English held-out (Debian Reference, in-domain)")]
    if any("forgetting_en_gpl3" in r["metrics"] for r in grid.get("rows", [])):
        panels.append(("forgetting_en_gpl3", "English out-of-domain (GPL-3)"))
    size = (7 * len(panels), 5.5)
    with figure(path, dpi=120, ncols=len(panels), figsize=size, squeeze=False) as (fig, axes):
        _draw_tradeoff(plt, fig, axes, panels, grid)
    return path


def _draw_tradeoff(
    plt: Any, fig: Any, axes: Any, panels: list[tuple[str, str]], grid: Mapping[str, Any]
) -> None:
    markers = {
        "constant": "o",
        "u_shaped": "s",
        "linear_increase": "^",
        "linear_decrease": "v",
    }
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for row in grid.get("rows", []):
            m, p = row["metrics"], row["params"]
            if m.get(key) is None or m.get("gain_retained") is None:
                continue
            if row["group"] == "main":
                marker = "*" if not p["moe_ct_mode"] else markers.get(str(p["alpha_strategy"]), "o")
                color = (
                    "black"
                    if not p["moe_ct_mode"]
                    else plt.cm.viridis(float(p["base_alpha"]) - 0.4)
                )
            elif row["group"] == "ablation":
                marker, color = "x", "tab:red"
            else:
                marker, color = ".", "grey"
            ax.scatter(100 * m[key], m["gain_retained"], marker=marker, color=color, s=60)
            if not row["group"].endswith("-seed"):
                ax.annotate(row["name"], (100 * m[key], m["gain_retained"]), fontsize=6)
        ax.set_xlabel(f"{title}: perplexity vs dense base (%)  [> 0 = forgetting]")
        ax.set_ylabel("share of the experts' log-ppl gain kept (de/fr/es)  [plasticity]")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "MoE-CT merge grid: forgetting vs plasticity  (marker = strategy, colour = base_alpha; "
        "black * = MoE-CT off; red x = ablations; grey = extra router seeds)",
        fontsize=9,
    )


def plot_strategies(grid: Mapping[str, Any], path: Path) -> Path:
    with figure(path, dpi=120, ncols=3, figsize=(13, 4)) as (_, axes):
        _draw_strategies(axes, grid)
    return path


def _draw_strategies(axes: Any, grid: Mapping[str, Any]) -> None:
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in grid.get("rows", []):
        if row["group"] != "main" or not row["params"]["moe_ct_mode"]:
            continue
        series.setdefault(str(row["params"]["alpha_strategy"]), []).append(
            (float(row["params"]["base_alpha"]), row["metrics"])
        )
    off = next((r["metrics"] for r in grid.get("rows", []) if r["name"] == "off"), None)
    for ax, key, label, scale in (
        (axes[0], "forgetting_en", "English ppl vs base (%)", 100),
        (axes[1], "gain_retained", "gain kept (de/fr/es)", 1),
        (axes[2], "mean_anchor_share", "anchor (base expert) share", 1),
    ):
        for name, pts in series.items():
            pts = sorted(pts, key=lambda t: t[0])
            xs = [a for a, m in pts if m.get(key) is not None]
            ys = [scale * m[key] for a, m in pts if m.get(key) is not None]
            ax.plot(xs, ys, marker="o", label=name)
        if off and off.get(key) is not None:
            ax.axhline(scale * off[key], color="black", ls="--", lw=1, label="MoE-CT off")
        ax.set_xlabel("base_alpha")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def plot_collapse(collapse: Mapping[str, Any], path: Path) -> Path:
    keys = (
        ("mean_cv", "CV of expert load"),
        ("mean_max_violation", "MaxVio"),
        ("mean_router_entropy", "router entropy"),
        ("mean_anchor_share", "anchor share"),
    )
    modes = collapse_groups(collapse)
    with figure(path, dpi=120, ncols=len(keys), figsize=(15, 3.6)) as (fig, axes):
        for ax, (key, label) in zip(axes, keys, strict=True):
            _draw_balance(ax, modes, key, label)
        axes[0].legend(fontsize=7)
        fig.suptitle(
            "moe_ct_training: routing balance on the training batches (mean ± std over seeds; "
            "moving average over 10 steps when longer than 40)"
        )
    return path


def _moving_average(values: Sequence[float], window: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def _draw_balance(ax: Any, modes: Mapping[str, list[dict[str, Any]]], key: str, label: str) -> None:
    for mode, runs in modes.items():
        steps = [h["step"] for h in runs[0]["history"]]
        means, stds = [], []
        for i in range(len(steps)):
            mean, std = mean_std([r["history"][i].get(key) for r in runs])
            means.append(math.nan if mean is None else mean)
            stds.append(0.0 if std is None else std)
        if len(steps) > 40:  # one training batch is noisy
            means, stds = _moving_average(means), _moving_average(stds)
        (line,) = ax.plot(steps, means, label=f"{mode} (n={len(runs)})")
        ax.fill_between(
            steps,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xlabel("step")
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------- files
def write_csvs(grid: Mapping[str, Any], collapse: Mapping[str, Any] | None, folder: Path) -> None:
    rows = grid.get("rows", [])
    if rows:
        keys = sorted(
            {k for r in rows for k, v in r["metrics"].items() if not isinstance(v, (list, dict))}
        )
        with open(folder / "grid.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            params = ["alpha_strategy", "base_alpha", "moe_ct_mode", "architecture"]
            params += ["include_base_expert", "router_aux_scale", "gate_mode", "seed"]
            w.writerow(["name", "group", *params, *keys])
            for r in rows:
                w.writerow(
                    [r["name"], r["group"], *[r["params"].get(p) for p in params]]
                    + [r["metrics"].get(k) for k in keys]
                )
    if collapse and collapse.get("runs"):
        with open(folder / "collapse.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            keys = [k for k in collapse["runs"][0]["history"][0] if k != "step"]
            w.writerow(["gate_mode", "aux_loss_coef", "seed", "step", *keys])
            for run in collapse["runs"]:
                for h in run["history"]:
                    w.writerow(
                        [run["gate_mode"], run.get("aux_loss_coef", 0.01), run["seed"], h["step"]]
                        + [h.get(k) for k in keys]
                    )


def _run_notes(
    grid: Mapping[str, Any],
    collapse: Mapping[str, Any] | None,
    timings: Mapping[str, float],
    label: str,
) -> list[str]:
    """The run's label, timings and, for an unfinished run, what is missing."""
    lines: list[str] = []
    if label:
        lines += [f"**Run:** {label}", ""]
    if timings:
        lines += [
            "Timings (row/run sums overlap when parts ran in parallel): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
            + ".",
            "",
        ]
    if grid.get("rows") and not grid.get("complete", True):
        lines += [
            f"**Partial grid:** {len(grid['rows'])} of {grid.get('planned_rows')} planned rows "
            "finished (rows run in priority order: the claim rows first).",
            "",
        ]
    if collapse and collapse.get("runs") and not collapse.get("complete", True):
        lines += [
            f"**Partial collapse study:** {len(collapse['runs'])} of "
            f"{collapse.get('planned_runs')} planned runs finished (seed-major order).",
            "",
        ]
    return lines


def generated_block(
    grid: Mapping[str, Any],
    collapse: Mapping[str, Any] | None,
    markers: Mapping[str, Mapping[str, Any]],
    img_rel: str,
    timings: Mapping[str, float],
    label: str = "",
    trained: Mapping[str, Any] | None = None,
) -> str:
    lines = [BEGIN, "", "## Results", ""]
    lines += _run_notes(grid, collapse, timings, label)
    lines += experts_section(markers)
    if grid.get("rows"):
        lines += references_section(grid)
        s = grid["settings"]
        lines += [
            f"Evaluation: held-out chapters, first {s['eval_tokens_per_language']} tokens per "
            "language (and of the GPL-3 text as out-of-domain English, `en_gpl3`), "
            f"windows of {s['window_length']}, {s['dtype']}; identical for every row. "
            "`gain kept` = (ln ppl_base - ln ppl) / (ln ppl_base - ln ppl_expert), averaged over "
            "de/fr/es (1 = as good as the language's own expert, 0 = as good as the dense base). "
            "`specialisation` = mean over de/fr/es of (share of expert X on language-X tokens "
            "- its share on English tokens).",
            "",
        ]
        lines += claims_section(grid, collapse, trained)
        lines += grid_section(grid)
        lines += [
            f"![forgetting vs plasticity]({img_rel}/forgetting_vs_plasticity.png)",
            "",
            f"![strategies]({img_rel}/strategies.png)",
            "",
        ]
        if trained and trained.get("runs"):
            lines += [f"![claim 2 after training]({img_rel}/trained.png)", ""]
        if len(sweep_rows(_by_name(grid))) >= 3:
            lines += [f"![router_aux_scale sweep]({img_rel}/aux_sweep.png)", ""]
    else:
        lines += trained_section(trained or {})
        lines += collapse_section(collapse) if collapse else []
    if collapse and collapse.get("runs"):
        lines += [f"![collapse]({img_rel}/collapse_balance.png)", ""]
        if any(r.get("curve") for r in collapse["runs"]):
            lines += [f"![held-out curves]({img_rel}/collapse_curves.png)", ""]
    lines += [
        f"Raw data: [`{img_rel}/results.json`]({img_rel}/results.json), "
        f"[`grid.csv`]({img_rel}/grid.csv), [`collapse.csv`]({img_rel}/collapse.csv).",
        "",
        END,
    ]
    return "\n".join(lines)


SKELETON = """# The MoE-CT study

(Hand-written sections go above and below the generated block; `python -m study`
only rewrites the block between the markers.)

{block}
"""


def write_report(
    grid: Mapping[str, Any] | None,
    collapse: Mapping[str, Any] | None,
    markers: Mapping[str, Mapping[str, Any]],
    doc_path: str | Path,
    img_dir: str | Path,
    timings: Mapping[str, float] | None = None,
    label: str = "",
    trained: Mapping[str, Any] | None = None,
) -> Path:
    """Write plots/CSVs/JSON into ``img_dir`` and the generated block of ``doc_path``."""
    grid = grid or {"rows": [], "settings": {}}
    img = ensure_dir(img_dir)
    doc_path = Path(doc_path)
    if grid.get("rows"):
        plot_tradeoff(grid, img / "forgetting_vs_plasticity.png")
        plot_strategies(grid, img / "strategies.png")
        by_name = _by_name(grid)
        if len(sweep_rows(by_name)) >= 3:
            plot_sweep(by_name, img / "aux_sweep.png")
    if trained and trained.get("runs"):
        plot_trained(trained, img / "trained.png")
    if collapse and collapse.get("runs"):
        plot_collapse(collapse, img / "collapse_balance.png")
        if any(r.get("curve") for r in collapse["runs"]):
            plot_curves(collapse, img / "collapse_curves.png")
    write_csvs(grid, collapse, img)
    (img / "results.json").write_text(
        json.dumps(
            {
                "label": label,
                "timings_seconds": dict(timings or {}),
                "experts": markers,
                "grid": grid,
                "trained": trained,
                "collapse": collapse,
            },
            indent=1,
        )
    )
    try:
        rel = str(Path(img).resolve().relative_to(doc_path.parent.resolve()))
    except ValueError:
        rel = str(Path(img).resolve())
    block = generated_block(grid, collapse, markers, rel, timings or {}, label, trained)
    if doc_path.exists() and BEGIN in (text := doc_path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc_path.write_text(head + block + tail)
    else:
        doc_path.parent.mkdir(parents=True, exist_ok=True)
        doc_path.write_text(SKELETON.format(block=block))
    return doc_path
