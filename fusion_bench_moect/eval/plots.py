"""PNG plots of evaluation results (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["plot_alpha_schedule", "plot_expert_load", "plot_leaderboard"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    # Lazy: matplotlib is an optional extra, and the backend is set before pyplot loads.
    import matplotlib

    matplotlib.use("Agg", force=True)
    # Lazy: after the backend is chosen.
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(path: str | Path, *, dpi: int = 110, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of ``plt.subplots(**subplots)``, saved to ``path`` (parent folders
    created) with a tight layout when the block ends, and closed in any case."""
    plt = pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_expert_load(
    shares: Sequence[Sequence[float]],
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    expert_names: Sequence[str] | None = None,
    anchors: Sequence[int] = (),
    title: str = "Expert load share per layer",
) -> Path:
    """Heatmap of each expert's share of routed tokens, layer x expert.

    Args:
        shares: One row of E shares per MoE layer.
        path: Output PNG path (parent folders are created).
        layers: Decoder-layer index of each row (default 0..rows-1).
        expert_names: Column labels (default the expert indices); anchors get a ``*``.
        anchors: Anchor expert indices, marked in the labels.
        title: Figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    rows = [list(r) for r in shares]
    num_layers, num_experts = len(rows), len(rows[0]) if rows else 0
    layers = list(layers) if layers is not None else list(range(num_layers))
    names = list(expert_names) if expert_names else [str(e) for e in range(num_experts)]
    labels = [f"{n}*" if i in set(anchors) else n for i, n in enumerate(names)]
    width = min(4 + 0.45 * num_experts, 30)
    height = min(2.5 + 0.22 * num_layers, 30)
    with figure(path, figsize=(width, height)) as (fig, ax):
        balanced = 1.0 / num_experts if num_experts else 1.0
        image = ax.imshow(
            rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2 * balanced, *map(max, rows))
        )
        cbar = fig.colorbar(image, ax=ax)
        cbar.set_label(f"share of routed tokens (balanced = {balanced:.3g})")
        ax.set_xticks(range(num_experts))
        ax.set_xticklabels(labels, rotation=90 if num_experts > 16 else 0, fontsize=8)
        step = max(1, math.ceil(num_layers / 32))
        ax.set_yticks(range(0, num_layers, step))
        ax.set_yticklabels([str(layers[i]) for i in range(0, num_layers, step)], fontsize=8)
        ax.set_xlabel("expert" + (" (* = anchor)" if anchors else ""))
        ax.set_ylabel("layer")
        ax.set_title(title)
    return path


def plot_alpha_schedule(
    alphas: Sequence[float], path: str | Path, *, title: str = "MoE-CT alpha per layer"
) -> Path:
    """Line plot of the per-layer fusion weight alpha_l.

    Args:
        alphas: One alpha per decoder layer.
        path: Output PNG path.
        title: Figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    with figure(path, figsize=(6.5, 3.5)) as (_, ax):
        ax.plot(range(len(alphas)), list(alphas), marker="o", markersize=3)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("alpha")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return path


def plot_leaderboard(
    labels: Sequence[str],
    values: Sequence[float | None],
    path: str | Path,
    *,
    metric: str,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Horizontal bar chart of one metric per leaderboard row (best first, at the top).

    Args:
        labels: Row labels, in rank order.
        values: The metric per row (``None`` is drawn as an empty bar).
        path: Output PNG path.
        metric: Metric name for the axis label.
        reference: Optional ``{label: value}`` drawn as dashed vertical lines (e.g. the
            dense baseline).
        title: Figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    with figure(path, figsize=(9, 1.4 + 0.35 * len(labels))) as (_, ax):
        ys = list(range(len(labels)))[::-1]
        spread = [v for v in (*values, *(reference or {}).values()) if v is not None]
        log_scale = bool(spread) and min(spread) > 0 and max(spread) / min(spread) > 50
        drawn = [v if v is not None else 0.0 for v in values]
        if log_scale:
            ax.set_xscale("log")
            left = min(spread) / 1.5
            ax.barh(ys, [v - left if v else 0.0 for v in drawn], left=left, color="tab:blue")
            ax.set_xlim(left, max(spread) * 3)
        else:
            ax.barh(ys, drawn, color="tab:blue")
            if spread:
                low, high = min(spread), max(spread)
                pad = (high - low) * 0.15 or abs(high) * 0.01 or 1.0
                ax.set_xlim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
        for y, v in zip(ys, values, strict=True):
            if v is not None:
                ax.text(v, y, f" {v:.4g}", va="center", fontsize=8)
        for name, ref_value in (reference or {}).items():
            ax.axvline(ref_value, linestyle="--", color="tab:red", label=f"{name}: {ref_value:.4g}")
        if reference:
            ax.legend(loc="best", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel(metric + (" (log scale)" if log_scale else ""))
        ax.set_title(title or f"Leaderboard by {metric}", fontsize=10)
    return path
