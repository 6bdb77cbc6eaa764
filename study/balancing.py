"""Does bias balancing balance without the aux loss's cost? (GLM4-MoE output)

For every balancing mode of ``moe_ct_training`` and seed: merge base + language experts
into ``glm4_moe`` (the study's merge: ``u_shaped``, ``base_alpha`` 0.8, base expert as
anchor; the seed drives the router initialisation), train a ``router`` stage, then an
``experts`` stage (anchors frozen) with ``balancing`` = ``aux_loss`` (the load-balancing
loss), ``bias`` (DeepSeek-V3's aux-loss-free router bias) or ``none``, evaluating held-out
text every ``curve_every`` steps (MaxVio, CV, perplexity per language) and after each stage
(perplexity per language, English forgetting against the dense base). The runs are those of
``trained`` with a ``trainer`` entry per row; the summary is ``balancing.json`` and
``render`` turns it into the section of docs/study.md (with ``balancing.png`` and, via
``compact``, ``balancing.json`` beside the document's images).

Usage::

    python -m study --parts balancing --balancing-seeds 0,1,2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import sections
from .common import pm, table
from .grid import grid_rows
from .report_training import trained_groups
from .trained import POINTS

#: The modes the question compares (``aux_loss+bias`` also exists; add it with ``--balancing-modes``).
BALANCING_MODES = ("aux_loss", "bias", "none")
#: The merge every run starts from: the study's u_shaped@0.8 row, as GLM4-MoE.
MERGE_ROW = "u_shaped@0.8"
SECTION = sections.Section("balancing")
BEGIN, END = SECTION.begin, SECTION.end
STAGES = ("router", "experts")


def balancing_rows(
    seeds: Sequence[int], modes: Sequence[str] = BALANCING_MODES
) -> list[dict[str, Any]]:
    """One row per (seed, mode), seed-major (a run cut short has every mode of its first seeds)."""
    base = next(r for r in grid_rows(quick=False) if r["name"] == MERGE_ROW)
    return [
        {
            **base,
            "name": mode,
            "group": "balancing",
            "params": {**base["params"], "architecture": "glm4_moe", "seed": seed},
            "trainer": {"balancing": mode},
            "index": i,
        }
        for i, (seed, mode) in enumerate((s, m) for s in seeds for m in modes)
    ]


def _bias_range(run: Mapping[str, Any]) -> float | None:
    """The spread of the router biases after the experts stage (None without bias balancing)."""
    last = run["histories"]["experts"][-1]
    return last["bias_max"] - last["bias_min"] if "bias_max" in last else None


def balance_table(summary: Mapping[str, Any]) -> list[str]:
    """Held-out MaxVio and CV at each point (mean ± std over seeds), per mode."""
    rows = []
    for mode, runs in trained_groups(summary).items():
        pts = [r["points"] for r in runs]
        rows.append(
            [
                mode,
                str(len(runs)),
                *(pm([p[point]["mean_max_violation"] for p in pts]) for point in POINTS),
                *(pm([p[point]["mean_cv"] for p in pts]) for point in ("merged", "experts")),
                pm([p["experts"]["dead_experts"] for p in pts], digits=1),
                pm([_bias_range(r) for r in runs], digits=4),
            ]
        )
    header = ["balancing", "seeds", "MaxVio merged", "MaxVio after router"]
    header += ["MaxVio after experts", "CV merged", "CV after experts"]
    return table([*header, "dead experts after experts", "bias range after experts"], rows)


def quality_table(summary: Mapping[str, Any]) -> list[str]:
    """Held-out perplexity per language after the experts stage and English forgetting."""
    langs = summary["settings"]["languages"]
    rows = []
    for mode, runs in trained_groups(summary).items():
        pts = [r["points"] for r in runs]
        rows.append(
            [
                mode,
                *(pm([p["experts"].get(f"ppl_{lang}") for p in pts]) for lang in langs),
                *(pm([p[point].get("forgetting_en") for p in pts], pct=True) for point in POINTS),
                pm([p["experts"].get("forgetting_en_gpl3") for p in pts], pct=True),
            ]
        )
    header = ["balancing", *(f"ppl {lang} after experts" for lang in langs)]
    header += [f"en forgetting {point}" for point in POINTS]
    return table([*header, "out-of-domain en (GPL-3) forgetting after experts"], rows)


def plot_curves(summary: Mapping[str, Any], path: Path) -> None:
    """Held-out MaxVio and CV over training (router stage, then experts stage), per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    router_steps = summary["settings"]["router_stage"]["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (mode, runs), color in zip(
        trained_groups(summary).items(), ("C0", "C1", "C2", "C3"), strict=False
    ):
        for key, ax in zip(("mean_max_violation", "mean_cv"), axes, strict=True):
            for i, run in enumerate(runs):
                xs, ys = [], []
                for stage, offset in zip(STAGES, (0, router_steps), strict=True):
                    for point in run.get("curves", {}).get(stage, []):
                        xs.append(point["step"] + offset)
                        ys.append(point.get(key))
                ax.plot(xs, ys, color=color, alpha=0.8, label=mode if i == 0 else None)
    for ax, label in zip(axes, ("held-out MaxVio (mean over layers)", "held-out CV"), strict=True):
        ax.axvline(router_steps, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("training step (router stage, then experts stage)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(
        "GLM4-MoE from SmolLM2 + language experts: balance during training (each seed a line)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compact(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary`` with each run's histories cut to their last step (what ``render`` reads):
    the record kept beside the document (``docs/study/balancing.json``)."""
    runs = [
        {
            **{k: v for k, v in run.items() if k != "settings"},
            "histories": {stage: h[-1:] for stage, h in run["histories"].items()},
        }
        for run in summary.get("runs", [])
    ]
    return {**summary, "runs": runs}


def render(summary: Mapping[str, Any], img_rel: str, command: str) -> str:
    """The docs/study.md section of a finished ``balancing.json``."""
    s = summary["settings"]
    lines = [
        BEGIN,
        "## Does bias balancing balance without the aux loss's cost? (GLM4-MoE)",
        "",
        f"Merge: `glm4_moe`, the study's `{MERGE_ROW}` row (base expert as anchor); then "
        f"{s['router_stage']['steps']} router-stage steps (lr {s['router_stage']['learning_rate']:g}) "
        f"and {s['experts_stage']['steps']} experts-stage steps (lr {s['experts_stage']['learning_rate']:g}, "
        f"anchor frozen), batch {s['batch_size']} x {s['seq_len']} tokens, constant LR, on the "
        "train split of the Debian Reference in every language. Balance is measured on held-out "
        "text (the held-out chapters; MaxVio = max over experts of load / mean load - 1, "
        "averaged over layers). Mean ± std over seeds.",
        "",
        *balance_table(summary),
        "",
        *quality_table(summary),
        "",
        f"![balance during training]({img_rel}/balancing.png)",
        "",
        f"Reproduce: `{command}`",
        END,
    ]
    return "\n".join(lines) + "\n"


def read_section(doc: Path) -> str | None:
    """The balancing section of ``doc``, if it has one."""
    return SECTION.read(doc)


def read_tail(doc: Path) -> str | None:
    """``doc`` from its balancing section to the end (the section and the notes written after
    it by hand), which a rewrite of the rest of the document keeps."""
    return sections.read_tail(doc, (SECTION,))


append_tail = sections.append_tail


def write_section(doc: Path, section: str) -> None:
    """Put ``section`` into ``doc`` in place of its previous one (else at the end)."""
    SECTION.write(doc, section)
