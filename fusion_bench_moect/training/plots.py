"""The training-history plot: losses, routing balance and held-out perplexity over steps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Any

from ..eval.plots import pyplot

HISTORY_PLOT = "training_history.png"
"""The plot's file name, beside the saved model and in the run's log directory."""


def plot_training_history(
    history: Sequence[Mapping[str, Any]],
    evaluations: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | IO[bytes],
    title: str = "moe_ct_training",
) -> str:
    """Write a 2x2 PNG: losses, CV / MaxVio, router entropy / anchor share, eval perplexity.

    Args:
        history: Per-step training records (``step``, ``loss``, ``lm_loss``, ``aux_loss``,
            ``mean_cv``, ``mean_max_violation``, ``mean_router_entropy``,
            ``mean_anchor_share``; with bias balancing ``bias_min``, ``bias_max``).
        evaluations: Evaluation records (``step``, ``perplexity``: {source: ppl}).
        path: Output PNG (or a binary file object).
        title: Figure title.

    Returns:
        ``path`` as a string.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [h["step"] for h in history]

    def curve(ax, key, label):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], label=label)

    for key, label in (("loss", "loss"), ("lm_loss", "LM loss"), ("aux_loss", "aux loss")):
        curve(axes[0, 0], key, label)
    axes[0, 0].set_title("training loss")
    curve(axes[0, 1], "mean_cv", "CV")
    curve(axes[0, 1], "mean_max_violation", "MaxVio")
    axes[0, 1].set_title("load balance (lower = more even)")
    curve(axes[1, 0], "mean_router_entropy", "router entropy")
    curve(axes[1, 0], "mean_anchor_share", "anchor share")
    curve(axes[1, 0], "bias_min", "router bias min")
    curve(axes[1, 0], "bias_max", "router bias max")
    axes[1, 0].set_title("routing")
    ax = axes[1, 1]
    sources = sorted({s for e in evaluations for s in e.get("perplexity", {})})
    for source in sources:
        points = [
            (e["step"], e["perplexity"][source])
            for e in evaluations
            if source in e.get("perplexity", {})
        ]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=source)
    ax.set_title("held-out perplexity" if sources else "held-out perplexity (eval_every = 0)")
    for a in axes.flat:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
