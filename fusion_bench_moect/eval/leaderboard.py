"""Leaderboards: a grid of method settings, each a real ``fusion_bench`` CLI run.

Every row of the grid runs ``python -m fusion_bench method=... modelpool=... taskpool=...``
with its overrides in a subprocess (the working directory is the caller's, so the same
configs are found as when you type the command yourself), writes its log folder under
``OUT/runs/<row>/`` (``path.log_dir``), and the row's ``program_report.json`` is read
back. An optional baseline row runs ``method=dummy`` (FusionBench's algorithm that returns
``_pretrained_`` unchanged), so the dense model is ranked on the same footing.

Outputs in ``OUT``: ``leaderboard.md`` (ranked table + the reproducing command),
``leaderboard.csv``, ``leaderboard.png`` (the ranking metric per row) and
``leaderboard.json`` (every row's settings, metrics, command and status).

Example::

    python -m fusion_bench_moect.cli.leaderboard \\
        --modelpool smollm2_upcycle --taskpool moe_text_perplexity \\
        --grid gate_mode=orthogonal,random,uniform_random \\
        --grid alpha_strategy=constant,u_shaped \\
        --set num_experts=8 --set taskpool.max_tokens_per_source=1024 \\
        --baseline --metric overall_perplexity --out outputs/leaderboard

A grid/set key without a ``method.``, ``modelpool.``, ``taskpool.`` (or other top-level)
prefix is a method parameter. Values are Hydra override values; commas inside brackets
do not split (``--grid 'alpha_strategy=u_shaped,[0.1,0.2]'`` has two values).
"""

from __future__ import annotations

import csv
import datetime as _dt
import itertools
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fusion_bench_moect.eval.plots import plot_leaderboard
from fusion_bench_moect.eval.routing import HEADLINE_METRICS

log = logging.getLogger(__name__)

__all__ = ["Row", "build_rows", "get_metric", "rank_rows", "row_command", "run_leaderboard", "slug"]

_TOP_LEVEL_PREFIXES = (
    "method.",
    "modelpool.",
    "taskpool.",
    "fabric.",
    "path.",
    "hydra.",
    "+",
    "~",
)

DEFAULT_COLUMNS = ("overall_perplexity", *(f"routing.overall.{k}" for k in HEADLINE_METRICS))

_SHORT_NAMES = {
    "overall_perplexity": "ppl (all)",
    "routing.overall.mean_cv": "CV",
    "routing.overall.mean_max_violation": "MaxVio",
    "routing.overall.max_max_violation": "MaxVio (max)",
    "routing.overall.mean_load_entropy": "load H",
    "routing.overall.mean_router_entropy": "router H",
    "routing.overall.dead_experts": "dead",
    "routing.overall.mean_anchor_share": "anchor share",
    "routing.overall.max_condition_number": "cond (max)",
}


@dataclass
class Row:
    """One leaderboard entry.

    Attributes:
        name: Human-readable settings, e.g. ``gate_mode=random alpha_strategy=u_shaped``.
        settings: ``{key: value}`` of the grid values of this row.
        overrides: Every Hydra override passed to ``fusion_bench`` for this row.
        method: The ``method=`` config group value.
        baseline: Whether this is the dense baseline row.
        report: The row's ``program_report.json`` once run.
        status: ``pending``, ``ok`` or ``failed``.
        cached: Whether the report was reused from an earlier run (``--resume``).
        seconds: Wall-clock seconds of the run.
        error: The end of the log of a failed run.
    """

    name: str
    settings: dict[str, str]
    overrides: list[str]
    method: str
    baseline: bool = False
    report: dict[str, Any] | None = None
    status: str = "pending"
    seconds: float | None = None
    error: str | None = None
    cached: bool = False
    run_dir: Path | None = field(default=None, repr=False)


def _qualify(key: str) -> str:
    return key if key.startswith(_TOP_LEVEL_PREFIXES) else f"method.{key}"


def _short_key(key: str) -> str:
    return key[len("method.") :] if key.startswith("method.") else key


def split_values(text: str) -> list[str]:
    """Split ``a,b,[c,d],{e: f}`` on top-level commas."""
    values, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    if any(v == "" for v in values):
        raise ValueError(f"Empty value in {text!r}.")
    return values


def _parse_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"Expected KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def build_rows(
    method: str,
    grid: Sequence[str],
    fixed: Sequence[str] = (),
    baseline: bool = False,
) -> list[Row]:
    """Expand the grid into rows (cartesian product, in the order given).

    Args:
        method: The ``method=`` config to run (e.g. ``moe_ct_upcycling``).
        grid: ``KEY=V1,V2,...`` items.
        fixed: ``KEY=VALUE`` overrides applied to every row (``method.`` ones not to the
            baseline).
        baseline: Prepend a ``method=dummy`` row (the pool's ``_pretrained_`` as is).

    Returns:
        The rows.
    """
    axes = []
    for item in grid:
        key, values = _parse_assignment(item)
        axes.append((_qualify(key), split_values(values)))
    fixed_overrides = [f"{_qualify(k)}={v}" for k, v in map(_parse_assignment, fixed)]
    rows = []
    if baseline:
        rows.append(
            Row(
                name="dense baseline (_pretrained_)",
                settings={},
                overrides=[o for o in fixed_overrides if not o.startswith("method.")],
                method="dummy",
                baseline=True,
            )
        )
    for combo in itertools.product(*(values for _, values in axes)) if axes else [()]:
        settings = {key: value for (key, _), value in zip(axes, combo, strict=True)}
        name = " ".join(f"{_short_key(k)}={v}" for k, v in settings.items()) or method
        overrides = fixed_overrides + [f"{k}={v}" for k, v in settings.items()]
        rows.append(Row(name=name, settings=settings, overrides=overrides, method=method))
    return rows


def get_metric(report: dict[str, Any] | None, path: str) -> Any:
    """Look up a dotted path (``routing.overall.mean_cv``, ``perplexity.en``) in a report."""
    value: Any = report
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rank_rows(rows: Sequence[Row], metric: str, higher_is_better: bool = False) -> list[Row]:
    """Rows sorted best first by ``metric`` (rows without the metric last, order kept on ties)."""

    def key(row: Row) -> tuple[int, float]:
        value = get_metric(row.report, metric)
        if not _is_number(value):
            return (1, 0.0)
        return (0, -float(value) if higher_is_better else float(value))

    return sorted(rows, key=key)


def slug(index: int, name: str) -> str:
    return f"{index:02d}_" + (
        re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("=", "-")).strip("_")[:80] or "row"
    )


def row_command(row: Row, modelpool: str, taskpool: str, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusion_bench",
        f"method={row.method}",
        f"modelpool={modelpool}",
        f"taskpool={taskpool}",
        *row.overrides,
        "++taskpool.reference_models=[]",
        f"path.log_dir={run_dir}",
        "print_config=false",
    ]


def run_row(row: Row, modelpool: str, taskpool: str, run_dir: Path, resume: bool = False) -> Row:
    """Run one row through the ``fusion_bench`` CLI and read its report.

    Args:
        row: The row (updated in place and returned).
        modelpool: ``modelpool=`` config.
        taskpool: ``taskpool=`` config.
        run_dir: The row's log directory (``path.log_dir``); ``run.log`` holds its output.
        resume: Reuse an existing ``program_report.json`` in ``run_dir``.

    Returns:
        The row, with ``report``, ``status``, ``seconds`` and ``error``.
    """
    row.run_dir = run_dir
    report_path = run_dir / "program_report.json"
    if resume and report_path.is_file():
        row.report = json.loads(report_path.read_text())
        meta_path = run_dir / "leaderboard_row.json"
        if meta_path.is_file():
            row.seconds = json.loads(meta_path.read_text()).get("seconds")
        row.status, row.cached = "ok", True
        return row
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path.unlink(missing_ok=True)
    command = row_command(row, modelpool, taskpool, run_dir)
    log.info("[%s] %s", row.name, shlex.join(command))
    started = time.perf_counter()
    with open(run_dir / "run.log", "w") as log_file:
        result = subprocess.run(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        )
    row.seconds = time.perf_counter() - started
    if result.returncode != 0 or not report_path.is_file():
        row.status = "failed"
        tail = (run_dir / "run.log").read_text(errors="replace").strip().splitlines()[-15:]
        row.error = "\n".join(tail)
        log.error("[%s] failed (exit %d):\n%s", row.name, result.returncode, row.error)
        return row
    row.report = json.loads(report_path.read_text())
    row.status = "ok"
    (run_dir / "leaderboard_row.json").write_text(
        json.dumps({"name": row.name, "command": command, "seconds": row.seconds}, indent=2)
    )
    return row


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _columns(rows: Sequence[Row], metric: str) -> list[str]:
    """The ranking metric, perplexity per source, then the default columns that any row has."""
    columns = [metric]
    for row in rows:
        for name in (row.report or {}).get("perplexity", {}):
            if f"perplexity.{name}" not in columns:
                columns.append(f"perplexity.{name}")
    for column in DEFAULT_COLUMNS:
        if column not in columns and any(get_metric(r.report, column) is not None for r in rows):
            columns.append(column)
    return columns


def _header(column: str) -> str:
    if column.startswith("perplexity."):
        return f"ppl {column.split('.', 1)[1]}"
    return _SHORT_NAMES.get(column, column)


def write_outputs(
    rows: Sequence[Row],
    out: Path,
    *,
    metric: str,
    higher_is_better: bool,
    command: str,
    modelpool: str,
    taskpool: str,
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``leaderboard.{md,csv,png,json}`` for ranked rows.

    Args:
        rows: The rows, already ranked.
        out: Output folder.
        metric: The ranking metric (dotted path).
        higher_is_better: Ranking direction, for the text.
        command: The command line that reproduces the leaderboard.
        modelpool: Model pool config name.
        taskpool: Task pool config name.
        title: Markdown title.

    Returns:
        ``{"md": ..., "csv": ..., "png": ..., "json": ...}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows, metric)
    baseline = next((r for r in rows if r.baseline and r.report), None)
    headers, table_rows = _table(rows, metric, columns, baseline)
    paths = {kind: out / f"leaderboard.{kind}" for kind in ("md", "csv", "png", "json")}
    _write_csv(paths["csv"], headers, table_rows)
    _plot(rows, metric, baseline, paths["png"], title)
    lines = _markdown_head(title, modelpool, taskpool, metric, higher_is_better)
    lines += _markdown_table(headers, table_rows)
    lines += _markdown_tail(metric, command, rows)
    paths["md"].write_text("\n".join(lines))
    summary = {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "modelpool": modelpool,
        "taskpool": taskpool,
        "command": command,
        "rows": [_row_record(r, columns) for r in rows],
    }
    paths["json"].write_text(json.dumps(summary, indent=2))
    return paths


def _table(
    rows: Sequence[Row], metric: str, columns: Sequence[str], baseline: Row | None
) -> tuple[list[str], list[dict[str, str]]]:
    """The table's headers and one dict of cells per row (rank only for rows with a metric)."""
    grid_keys: list[str] = []
    for row in rows:
        grid_keys += [key for key in row.settings if key not in grid_keys]
    base_ppl = get_metric(baseline.report, "overall_perplexity") if baseline else None
    table_rows = []
    rank = 0
    for row in rows:
        rank_text = ""
        if _is_number(get_metric(row.report, metric)):
            rank += 1
            rank_text = str(rank)
        cells = {
            "rank": rank_text,
            "row": row.name,
            **{_short_key(k): row.settings.get(k, "") for k in grid_keys},
            **{_header(c): _format(get_metric(row.report, c)) for c in columns},
        }
        ppl = get_metric(row.report, "overall_perplexity")
        if _is_number(base_ppl) and _is_number(ppl) and base_ppl:
            cells["ppl (all) / dense"] = f"{ppl / base_ppl:.5f}"
        cells["seconds"] = f"{row.seconds:.1f}" if row.seconds is not None else ""
        cells["status"] = row.status
        table_rows.append(cells)
    headers: list[str] = []
    for cells in table_rows:
        headers += [key for key in cells if key not in headers]
    return headers, table_rows


def _write_csv(path: Path, headers: Sequence[str], table_rows: Sequence[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=headers)
        writer.writeheader()
        for cells in table_rows:
            writer.writerow({h: cells.get(h, "") for h in headers})


def _plot(
    rows: Sequence[Row], metric: str, baseline: Row | None, path: Path, title: str | None
) -> None:
    base_value = get_metric(baseline.report, metric) if baseline else None
    ranked = [r for r in rows if r.report is not None and not r.baseline]
    plot_leaderboard(
        [r.name for r in ranked],
        [get_metric(r.report, metric) for r in ranked],
        path,
        metric=metric,
        reference={"dense baseline": base_value} if _is_number(base_value) else None,
        title=title,
    )


def _markdown_head(
    title: str | None, modelpool: str, taskpool: str, metric: str, higher_is_better: bool
) -> list[str]:
    return [
        f"# {title or 'Leaderboard'}",
        "",
        f"Model pool `{modelpool}`, task pool `{taskpool}`; ranked by `{metric}` "
        f"({'higher' if higher_is_better else 'lower'} is better). Each row is one "
        "`fusion_bench` run; the dense baseline is `method=dummy` (the pool's `_pretrained_`).",
        "",
    ]


def _markdown_table(headers: Sequence[str], table_rows: Sequence[dict[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for cells in table_rows:
        lines.append(
            "| " + " | ".join(str(cells.get(h, "")).replace("|", "\\|") for h in headers) + " |"
        )
    return lines


def _markdown_tail(metric: str, command: str, rows: Sequence[Row]) -> list[str]:
    """The plot, the reproducing command, the versions, and the failed rows' errors."""
    # Lazy: the runner only spawns ``fusion_bench``; torch and transformers for versions only.
    import torch
    import transformers

    lines = [
        "",
        f"![{metric} per row](leaderboard.png)",
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} with Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, fusion-bench {_dist_version('fusion-bench')}, "
        f"fusion-bench-moect {_git_revision() or _dist_version('fusion-bench-moect')}, on "
        f"{platform.machine()} ({os.cpu_count()} CPUs). Per-row logs and reports: `runs/`.",
        "",
    ]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        lines += ["Failed rows:", ""]
        for row in failed:
            lines += [f"- `{row.name}`:", "", "```", row.error or "", "```", ""]
    return lines


def _row_record(row: Row, columns: Sequence[str]) -> dict[str, Any]:
    return {
        "name": row.name,
        "settings": row.settings,
        "method": row.method,
        "overrides": row.overrides,
        "baseline": row.baseline,
        "status": row.status,
        "cached": row.cached,
        "seconds": row.seconds,
        "metrics": {c: get_metric(row.report, c) for c in columns},
        "run_dir": str(row.run_dir) if row.run_dir else None,
        "error": row.error,
    }


def _git_revision() -> str | None:
    """``<short hash>[-dirty]`` of the checkout holding this package, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_leaderboard(
    *,
    modelpool: str,
    taskpool: str,
    out: str | os.PathLike,
    method: str = "moe_ct_upcycling",
    grid: Sequence[str] = (),
    fixed: Sequence[str] = (),
    baseline: bool = False,
    metric: str = "overall_perplexity",
    higher_is_better: bool = False,
    resume: bool = False,
    title: str | None = None,
    command: str | None = None,
) -> tuple[list[Row], dict[str, Path]]:
    """Run every row and write the leaderboard files.

    Args:
        modelpool: ``modelpool=`` config name.
        taskpool: ``taskpool=`` config name.
        out: Output folder (rows under ``out/runs``).
        method: ``method=`` config name.
        grid: ``KEY=V1,V2`` items (cartesian product).
        fixed: ``KEY=VALUE`` overrides for every row.
        baseline: Add the dense ``method=dummy`` row.
        metric: Dotted report path to rank by.
        higher_is_better: Rank descending.
        resume: Reuse rows whose report already exists.
        title: Title of the Markdown page.
        command: The command line to print as "Reproduce" (default: this call's ``sys.argv``).

    Returns:
        The ranked rows and the written files.
    """
    out = Path(out).resolve()
    rows = build_rows(method, grid, fixed, baseline)
    for index, row in enumerate(rows):
        run_row(row, modelpool, taskpool, out / "runs" / slug(index, row.name), resume=resume)
        log.info("[%d/%d] %s: %s", index + 1, len(rows), row.name, row.status)
    ranked = rank_rows(rows, metric, higher_is_better)
    if command is None:
        args = [a for a in sys.argv[1:] if a != "--resume"]  # not part of the definition
        command = shlex.join(["python", "-m", "fusion_bench_moect.cli.leaderboard", *args])
    files = write_outputs(
        ranked,
        out,
        metric=metric,
        higher_is_better=higher_is_better,
        command=command,
        modelpool=modelpool,
        taskpool=taskpool,
        title=title,
    )
    return ranked, files
