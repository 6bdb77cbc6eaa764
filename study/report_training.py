"""Report pieces of the study's second edition: claim 2 after continued training, claim 3's
``router_aux_scale`` sweep, and claim 1's held-out curves during training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.plots import figure

from .common import fmt, mean_std, pm, table
from .grid import AUX_SWEEP

POINT_LABELS = {
    "merged": "merged",
    "router": "after router stage",
    "experts": "after experts stage",
}
#: (row name, router_aux_scale) of claim 3's sweep, all u_shaped@0.8 with the base expert.
SWEEP_ROWS = (
    ("u_shaped@0.8 aux1.0", 1.0),
    ("u_shaped@0.8", 1.1),
    *((f"u_shaped@0.8 aux{scale:g}", scale) for scale in AUX_SWEEP),
)


# ------------------------------------------------------------ claim 2, trained
def trained_groups(trained: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in trained.get("runs", []):
        groups.setdefault(run["name"], []).append(run)
    return groups


def trained_section(trained: Mapping[str, Any]) -> list[str]:
    """Claim 2 on the trained model: forgetting and gain kept at each point, over seeds."""
    if not trained or not trained.get("runs"):
        return []
    s = trained["settings"]
    rows = []
    for name, runs in trained_groups(trained).items():
        for point, label in POINT_LABELS.items():
            pts = [r["points"][point] for r in runs if point in r["points"]]
            rows.append(
                [
                    name if point == "merged" else "",
                    label,
                    str(len(pts)),
                    pm([p.get("forgetting_en") for p in pts], pct=True),
                    pm([p.get("forgetting_en_gpl3") for p in pts], pct=True),
                    pm([p.get("gain_retained") for p in pts]),
                    pm([p.get("mean_anchor_share") for p in pts]),
                    pm([p.get("specialisation") for p in pts]),
                ]
            )
    r, e = s["router_stage"], s["experts_stage"]
    return [
        "### Claim 2 after continued training (mean ± std over router seeds)",
        "",
        f"Each row: merge, then `moe_ct_training` stage `router` ({r['steps']} steps, lr "
        f"{r['learning_rate']:g}), then stage `experts` ({e['steps']} steps, lr "
        f"{e['learning_rate']:g}; anchors frozen), {s['batch_size']} x {s['seq_len']} tokens "
        f"per step of mixed {'/'.join(s['languages'])} train text, constant learning rate; "
        f"evaluated after each stage on the grid's held-out tokens "
        f"({s['eval_tokens_per_language']} per language).",
        "",
        *table(
            [
                "row",
                "point",
                "seeds",
                "English (Debian Ref.) vs dense base",
                "English out-of-domain (GPL-3) vs base",
                "gain kept (de/fr/es)",
                "anchor share",
                "specialisation",
            ],
            rows,
        ),
        "",
    ]


def plot_trained(trained: Mapping[str, Any], path: Path) -> Path:
    """Forgetting (GPL-3 and in-domain English) against gain kept, merged -> router ->
    experts, one arrowed line per row (means over seeds)."""
    panels = (
        ("forgetting_en_gpl3", "English out-of-domain (GPL-3)"),
        ("forgetting_en", "English in-domain"),
    )
    with figure(path, dpi=120, ncols=2, figsize=(13, 5.2)) as (fig, axes):
        for ax, (key, title) in zip(axes, panels, strict=True):
            for name, runs in trained_groups(trained).items():
                xs, ys = [], []
                for point in POINT_LABELS:
                    x, _ = mean_std([r["points"][point].get(key) for r in runs])
                    y, _ = mean_std([r["points"][point].get("gain_retained") for r in runs])
                    xs.append(math.nan if x is None else 100 * x)
                    ys.append(math.nan if y is None else y)
                (line,) = ax.plot(xs, ys, marker="o", label=f"{name} (n={len(runs)})")
                ax.annotate(
                    "",
                    xy=(xs[-1], ys[-1]),
                    xytext=(xs[-2], ys[-2]),
                    arrowprops={"arrowstyle": "->", "color": line.get_color()},
                )
                ax.scatter(xs[:1], ys[:1], marker="s", color=line.get_color(), s=50)
            ax.set_xlabel(f"{title}: perplexity vs dense base (%)  [> 0 = forgetting]")
            ax.set_ylabel("gain kept (de/fr/es)  [plasticity]")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(
            "Claim 2 through continued training: square = merged, then after the router "
            "stage, arrow = after the experts stage",
            fontsize=9,
        )
    return path


# ------------------------------------------------------------ claim 3, sweep
def sweep_rows(
    by_name: Mapping[str, list[dict[str, Any]]],
) -> list[tuple[float, list[dict[str, Any]]]]:
    """(scale, rows) of claim 3's sweep present in the grid."""
    return [(scale, by_name[name]) for name, scale in SWEEP_ROWS if by_name.get(name)]


def _other_lang_anchor_share(metrics: Mapping[str, Any]) -> float | None:
    vals = [
        v
        for k, v in metrics.items()
        if k.startswith("anchor_share_")
        and k not in ("anchor_share_en", "anchor_share_en_gpl3")
        and v is not None
    ]
    return sum(vals) / len(vals) if vals else None


def sweep_section(by_name: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Claim 3's limit: anchor share and its cost as ``router_aux_scale`` grows."""
    sweep = sweep_rows(by_name)
    if len(sweep) < 3:
        return []
    rows = []
    for scale, reps in sweep:
        m = [r["metrics"] for r in reps]
        rows.append(
            [
                f"{scale:g}",
                str(len(reps)),
                pm([x.get("mean_anchor_share") for x in m]),
                pm([x.get("anchor_share_en") for x in m]),
                pm([_other_lang_anchor_share(x) for x in m]),
                pm([x.get("forgetting_en") for x in m], pct=True),
                pm([x.get("forgetting_en_gpl3") for x in m], pct=True),
                pm([x.get("gain_retained") for x in m]),
            ]
        )
    balanced = next(
        (r["metrics"].get("anchor_balanced_share") for _, rs in sweep for r in rs), None
    )
    return [
        "### Claim 3: anchor share as a function of router_aux_scale (u_shaped@0.8)",
        "",
        *table(
            [
                "router_aux_scale",
                "seeds",
                "anchor share (all tokens)",
                "on English",
                "on de/fr/es",
                "English (Debian Ref.) vs base",
                "GPL-3 vs base",
                "gain kept",
            ],
            rows,
        ),
        "",
        f"(Balanced anchor share = {fmt(balanced)}.)",
        "",
    ]


def plot_sweep(by_name: Mapping[str, list[dict[str, Any]]], path: Path) -> Path:
    """Anchor share (all, English, other languages) against ``router_aux_scale``."""
    sweep = sweep_rows(by_name)
    series = (
        ("all tokens", lambda m: m.get("mean_anchor_share")),
        ("English tokens", lambda m: m.get("anchor_share_en")),
        ("de/fr/es tokens", _other_lang_anchor_share),
    )
    with figure(path, dpi=120, ncols=2, figsize=(11, 4)) as (_, axes):
        for label, get in series:
            stats = [mean_std([get(r["metrics"]) for r in reps]) for _, reps in sweep]
            _errorbar(axes[0], [s for s, _ in sweep], stats, label)
        axes[0].set_xlabel("router_aux_scale (anchor router row multiplier)")
        axes[0].set_title("anchor (base expert) share of top-k slots", fontsize=10)
        axes[0].legend(fontsize=7)
        for key, label in (("forgetting_en", "English in-domain"), ("forgetting_en_gpl3", "GPL-3")):
            stats = [mean_std([r["metrics"].get(key) for r in reps]) for _, reps in sweep]
            _errorbar(axes[1], [s for s, _ in sweep], stats, label, scale=100)
        axes[1].set_xlabel("router_aux_scale")
        axes[1].set_title("perplexity vs dense base (%)", fontsize=10)
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
    return path


def _errorbar(
    ax: Any,
    xs: Sequence[float],
    stats: Sequence[tuple[float | None, float | None]],
    label: str,
    scale: float = 1.0,
) -> None:
    """Means with ± std bars (``stats`` from ``mean_std``; missing values are gaps)."""
    ax.errorbar(
        list(xs),
        [math.nan if m is None else scale * m for m, _ in stats],
        yerr=[0.0 if d is None else scale * d for _, d in stats],
        marker="o",
        capsize=3,
        label=label,
    )


# ------------------------------------------------------------ claim 1, curves
def collapse_groups(collapse: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by gate mode and load-balancing loss (``orthogonal, aux 0.01``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in collapse.get("runs", []):
        coef = run.get("aux_loss_coef", 0.01)
        label = f"{run['gate_mode']}, " + (f"aux {coef:g}" if coef else "no aux loss")
        groups.setdefault(label, []).append(run)
    return groups


def curve_section(collapse: Mapping[str, Any]) -> list[str]:
    """Held-out specialisation and balance at each evaluation during training."""
    groups = collapse_groups(collapse)
    runs = [r for rs in groups.values() for r in rs if r.get("curve")]
    if not runs:
        return []
    steps = [c["step"] for c in runs[0]["curve"]]
    rows = []
    for key, label in (("specialisation", "specialisation"), ("mean_cv", "load CV")):
        for name, rs in groups.items():
            cells = [label, name, str(len(rs))]
            for i in range(len(steps)):
                cells.append(
                    pm([r["curve"][i].get(key) for r in rs if len(r.get("curve", [])) > i])
                )
            rows.append(cells)
    s = collapse["settings"]
    return [
        "#### Held-out routing during training (mean ± std over seeds)",
        "",
        f"Evaluated every {s.get('curve_eval_every')} steps on the first "
        f"{s.get('curve_eval_tokens_per_language')} held-out tokens per language.",
        "",
        *table(["metric", "gate mode, aux loss", "seeds", *[f"step {st}" for st in steps]], rows),
        "",
    ]


def plot_curves(collapse: Mapping[str, Any], path: Path) -> Path:
    """Held-out specialisation, load CV and perplexity against training steps."""
    keys = (
        ("specialisation", "held-out specialisation"),
        ("mean_cv", "held-out load CV"),
        ("dead_experts", "held-out dead (layer, expert) slots"),
        ("overall_perplexity", "held-out perplexity (all languages)"),
    )
    groups = {k: [r for r in v if r.get("curve")] for k, v in collapse_groups(collapse).items()}
    with figure(path, dpi=120, ncols=len(keys), figsize=(16, 3.8)) as (fig, axes):
        for ax, (key, label) in zip(axes, keys, strict=True):
            for name, runs in groups.items():
                if not runs:
                    continue
                steps = [c["step"] for c in runs[0]["curve"]]
                stats = [
                    mean_std([r["curve"][i].get(key) for r in runs]) for i in range(len(steps))
                ]
                _errorbar(ax, steps, stats, f"{name} (n={len(runs)})")
            ax.set_xlabel("step")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("moe_ct_training: held-out routing during training (mean ± std over seeds)")
    return path
