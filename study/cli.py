"""Reproduce the MoE-CT study: experts -> merge grid -> trained rows -> collapse runs -> balancing (GLM4-MoE) -> forgetting (replay) -> docs/study.md.

Usage::

    python -m study            # the full run (docs/study.md numbers)
    python -m study --quick    # smoke run, < 20 min on a 2-core CPU
    python -m study --parts grid,collapse --resume

``--quick`` trains its own small experts (in ``<cache>/experts-quick``), runs a handful
of grid rows, 2 trained rows of a few steps and 2 seeds x 2 gate modes x aux loss on/off of
a few steps, on fewer evaluation tokens, and
writes to ``outputs/study-quick`` (``--doc``/``--img-dir`` to put it elsewhere) so that it
never overwrites the full run's document.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fusion_bench_moect.paths import cache_root

from . import balancing as balancing_mod
from . import collapse as collapse_mod
from . import experts as experts_mod
from . import forgetting as forgetting_mod
from . import grid as grid_mod
from . import sections
from . import trained as trained_mod
from .report import write_report

log = logging.getLogger(__name__)

PARTS = ("experts", "grid", "trained", "collapse", "balancing", "forgetting", "report")
#: The sections the parts write into the document themselves, which the report keeps.
PART_SECTIONS = (balancing_mod.SECTION, forgetting_mod.SECTION)


def _parse_ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The study's options (the expert options included)."""
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 20 min on CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument(
        "--out", default=None, help="working folder (default outputs/study[-quick])"
    )
    parser.add_argument("--doc", default=None, help="document (default docs/study.md)")
    parser.add_argument("--img-dir", default=None, help="plots/CSV folder (default docs/study)")
    parser.add_argument("--resume", action="store_true", help="reuse finished grid rows / runs")
    parser.add_argument(
        "--eval-tokens", type=int, default=None, help="held-out tokens per language"
    )
    parser.add_argument("--focus-seeds", default=None, help="router seeds of the claim rows")
    parser.add_argument(
        "--grid-shard",
        default=None,
        help="K/N: run every N-th grid row (priority order) from K, e.g. to run 2 processes "
        "in parallel; then collect with --parts grid --resume",
    )
    parser.add_argument(
        "--trained-rows",
        default=None,
        help=f"grid rows trained after the merge (default {','.join(trained_mod.TRAINED_ROWS)})",
    )
    parser.add_argument("--router-steps", type=int, default=None, help="router stage steps")
    parser.add_argument("--trained-batch-size", type=int, default=2)
    parser.add_argument("--experts-steps", type=int, default=None, help="experts stage steps")
    parser.add_argument("--router-lr", type=float, default=5e-4)
    parser.add_argument("--experts-lr", type=float, default=1e-4)
    _add_collapse_arguments(parser)
    _add_balancing_arguments(parser)
    _add_forgetting_arguments(parser)
    parser.add_argument("--label", default="", help="a line describing the run, in the doc")
    experts_mod.add_arguments(parser)
    return parser


def _add_balancing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the balancing runs (``--balancing-*``; GLM4-MoE output)."""
    parser.add_argument("--balancing-seeds", default=None, help="router seeds (default 0,1,2)")
    parser.add_argument(
        "--balancing-modes",
        default=",".join(balancing_mod.BALANCING_MODES),
        help="moe_ct_training balancing modes",
    )
    parser.add_argument("--balancing-router-steps", type=int, default=None, help="default 200")
    parser.add_argument("--balancing-experts-steps", type=int, default=None, help="default 200")
    parser.add_argument(
        "--balancing-curve-every", type=int, default=None, help="steps between held-out checks"
    )


def _add_forgetting_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the replay runs (``--forgetting-*``; MoE and dense)."""
    parser.add_argument("--forgetting-seeds", default=None, help="seeds (default 0,1)")
    parser.add_argument(
        "--forgetting-replay",
        default=None,
        help="English replay ratios (default "
        + ",".join(f"{r:g}" for r in forgetting_mod.REPLAY_RATIOS)
        + ")",
    )
    parser.add_argument("--forgetting-models", default=None, help="moe,dense (default both)")
    parser.add_argument("--forgetting-router-steps", type=int, default=None, help="default 100")
    parser.add_argument("--forgetting-experts-steps", type=int, default=None, help="default 100")
    parser.add_argument(
        "--forgetting-curve-every", type=int, default=None, help="steps between held-out checks"
    )


def _add_collapse_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the collapse runs (``--collapse-*``)."""
    parser.add_argument("--collapse-seeds", default=None)
    parser.add_argument("--collapse-steps", type=int, default=None)
    parser.add_argument("--collapse-eval-tokens", type=int, default=None)
    parser.add_argument("--collapse-batch-size", type=int, default=2)
    parser.add_argument("--collapse-seq-len", type=int, default=64)
    parser.add_argument("--collapse-lr", type=float, default=2e-4, help="constant learning rate")
    parser.add_argument(
        "--collapse-stage",
        default="router",
        choices=("router", "experts"),
        help="moe_ct_training stage of the collapse runs (router: the stage the init affects)",
    )
    parser.add_argument(
        "--collapse-modes",
        default=",".join(collapse_mod.CLAIM_GATE_MODES),
        help=f"gate modes, of {','.join(collapse_mod.GATE_MODES)}",
    )
    parser.add_argument(
        "--collapse-aux",
        default=",".join(f"{c:g}" for c in collapse_mod.AUX_LOSS_COEFS),
        help="load-balancing loss coefficients (0 = off)",
    )
    parser.add_argument(
        "--collapse-extra",
        default=None,
        help="other collapse.json files (comma-separated, e.g. from a parallel --out with "
        "other --collapse-modes) whose runs the report adds",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("fusion_bench", "httpx", "lightning", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parts = {p for p in args.parts.split(",") if p}
    run = _resolve(args)
    _check(parser, args, parts, run)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    markers = _experts_part(run, args, "experts" in parts, timings)
    runners = {
        "grid": _run_grid,
        "trained": _run_trained,
        "collapse": _run_collapse,
        "balancing": _run_balancing,
        "forgetting": _run_forgetting,
    }
    done = {
        name: _part(
            name in parts,
            run.out / name / f"{name}.json",
            timings,
            functools.partial(fn, run, args),
        )
        for name, fn in runners.items()
    }
    grid, trained, collapse = done["grid"], done["trained"], done["collapse"]
    if args.collapse_extra:
        collapse = collapse_mod.combine_runs(
            collapse, [Path(p) for p in args.collapse_extra.split(",") if p]
        )
    for name, summary, key in (("grid", grid, "rows"), ("trained", trained, "runs"),
                               ("collapse", collapse, "runs")):  # fmt: skip
        if summary and summary.get(key):
            timings[f"{name} (sum of {key[:-1]} times)"] = sum(
                r.get("seconds", 0.0) for r in summary[key]
            )
    if time.perf_counter() - started > 5:
        timings["this invocation"] = time.perf_counter() - started
    if "report" in parts:
        label = args.label or _label(run)
        # a report written anew (no generated block yet) drops the rest of the document:
        # the parts' sections and the notes after them then go back at its end
        kept = sections.read_tail(run.doc, PART_SECTIONS)
        path = write_report(
            grid, collapse, markers, run.doc, run.img, timings, label, trained=trained
        )
        if kept and not any(section.read(run.doc) for section in PART_SECTIONS):
            sections.append_tail(run.doc, kept)
        print(f"Report: {path}  (plots and data in {run.img})")
    for part, module, plot in (("balancing", balancing_mod, balancing_mod.plot_curves),
                               ("forgetting", forgetting_mod, forgetting_mod.plot)):  # fmt: skip
        if part in parts and done[part] and done[part].get("complete"):
            _write_section(run, args, part, done[part], module, plot)
    return 0


def _check(
    parser: argparse.ArgumentParser, args: argparse.Namespace, parts: set[str], run: SimpleNamespace
) -> None:
    """Bad parts or part options end the run here, in one line, before any part runs."""
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
    if "forgetting" in parts:
        try:
            _forgetting_rows(run, args)
        except ValueError as err:
            parser.error(f"--forgetting-*: {err}")


def _label(run: SimpleNamespace) -> str:
    """The report's line about this run: kind, time, machine."""
    return (
        f"{'quick' if run.quick else 'full'} run, "
        f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{'GPU' if torch.cuda.is_available() else 'CPU'}"
    )


def _write_section(
    run: SimpleNamespace,
    args: argparse.Namespace,
    part: str,
    summary: dict[str, Any],
    module: Any,
    plot: Callable[[dict[str, Any], Path], Any],
) -> None:
    """A finished part's plot, compact record (``<part>.json``, what the section renders
    from) and section of the document, with the command that reproduces it."""
    run.img.mkdir(parents=True, exist_ok=True)
    plot(summary, run.img / f"{part}.png")
    (run.img / f"{part}.json").write_text(json.dumps(module.compact(summary), indent=1))
    rel = Path(os.path.relpath(run.img.resolve(), run.doc.parent.resolve())).as_posix()
    command = f"python -m study --parts {part} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in _part_flags(args, part).items()
    )
    module.SECTION.write(run.doc, module.render(summary, str(rel), command))
    print(f"{part.capitalize()} section: {run.doc}")


def _resolve(args: argparse.Namespace) -> SimpleNamespace:
    """Folders, token budgets, seeds and expert settings of this run (``--quick`` defaults)."""
    quick = args.quick
    out = Path(args.out or ("outputs/study-quick" if quick else "outputs/study"))
    settings = experts_mod.settings_from_args(args)
    experts_root = args.experts_dir
    if quick:
        if args.steps == experts_mod.ExpertSettings().steps:
            settings = experts_mod.ExpertSettings(**{**settings.__dict__, "steps": 10})
        experts_root = experts_root or str(cache_root() / "experts-quick")
    langs = [s for s in args.langs.split(",") if s]
    return SimpleNamespace(
        quick=quick,
        out=out,
        doc=Path(args.doc or (out / "study.md" if quick else "docs/study.md")),
        img=Path(args.img_dir or (out / "img" if quick else "docs/study")),
        eval_tokens=args.eval_tokens or (512 if quick else 1024),
        focus_seeds=_parse_ints(args.focus_seeds)
        if args.focus_seeds
        else ([] if quick else [42, 1, 2]),
        collapse_seeds=_parse_ints(args.collapse_seeds)
        if args.collapse_seeds
        else ([0, 1] if quick else [0, 1, 2]),
        collapse_steps=args.collapse_steps or (6 if quick else 200),
        trained_rows=[r for r in args.trained_rows.split(",") if r]
        if args.trained_rows
        else (["off", "u_shaped@0.8"] if quick else list(trained_mod.TRAINED_ROWS)),
        router_steps=args.router_steps or (3 if quick else 30),
        experts_steps=args.experts_steps or (3 if quick else 30),
        settings=settings,
        experts_root=experts_root,
        langs=langs,
        base_dir=str(experts_mod.base_model_dir()),
        experts={lang: str(experts_mod.expert_dir(lang, experts_root)) for lang in langs},
    )


def _experts_part(
    run: SimpleNamespace, args: argparse.Namespace, build: bool, timings: dict[str, float]
) -> dict[str, Any]:
    """Build the experts (``build``) or read their markers."""
    t0 = time.perf_counter()
    if build:
        markers = experts_mod.build_experts(
            run.langs,
            run.settings,
            root=run.experts_root,
            accelerator=args.accelerator,
            force=args.force,
        )
    else:
        markers = {}
        for lang in run.langs:
            path = experts_mod.expert_dir(lang, run.experts_root) / experts_mod.MARKER
            if path.exists():
                markers[lang] = json.loads(path.read_text())
    if time.perf_counter() - t0 > 5:  # not when every expert was already up to date
        timings["experts"] = time.perf_counter() - t0
    return markers


def _part(
    build: bool, saved: Path, timings: dict[str, float], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """Run a part (``build``) and time it under its folder's name, or read what it last wrote
    to ``saved``."""
    if not build:
        return json.loads(saved.read_text()) if saved.exists() else None
    t0 = time.perf_counter()
    result = compute()
    timings[saved.parent.name] = time.perf_counter() - t0
    return result


def _run_grid(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    rows = grid_mod.grid_rows(quick=run.quick, focus_seeds=run.focus_seeds)
    if args.grid_shard:
        k, n = (int(v) for v in args.grid_shard.split("/"))
        rows = grid_mod.priority_order(rows)[k::n]
    log.info("Grid: %d rows", len(rows))
    return grid_mod.run_grid(
        run.base_dir,
        run.experts,
        run.out / "grid",
        rows,
        eval_tokens=run.eval_tokens,
        resume=args.resume,
    )


def _run_trained(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    rows = trained_mod.trained_rows(run.focus_seeds or [42], run.trained_rows)
    log.info("Trained: %d runs", len(rows))
    return trained_mod.run_trained(
        run.base_dir,
        run.experts,
        run.out / "trained",
        rows,
        router_steps=run.router_steps,
        experts_steps=run.experts_steps,
        **_training_settings(run, args),
    )


def _training_settings(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    """What the trained and balancing runs share: learning rates, batches, evaluation."""
    return dict(
        router_lr=args.router_lr,
        experts_lr=args.experts_lr,
        batch_size=args.trained_batch_size,
        seq_len=args.collapse_seq_len,
        eval_tokens=run.eval_tokens,
        resume=args.resume,
    )


def _part_flags(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """The ``--<part>-*`` values of this invocation (what the document's command repeats)."""
    return {k: v for k, v in vars(args).items() if k.startswith(f"{part}_") and v is not None}


def _run_balancing(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    seeds = _parse_ints(args.balancing_seeds) if args.balancing_seeds else [0, 1, 2]
    rows = balancing_mod.balancing_rows(
        seeds[:1] if run.quick and not args.balancing_seeds else seeds,
        [m for m in args.balancing_modes.split(",") if m],
    )
    return _run_stages(run, args, "balancing", rows, steps=200, curve_every=50)


def _forgetting_rows(run: SimpleNamespace, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The replay runs the ``--forgetting-*`` options ask for (ValueError for bad ones)."""
    seeds = _parse_ints(args.forgetting_seeds) if args.forgetting_seeds else [0, 1]
    replays = forgetting_mod.REPLAY_RATIOS
    if args.forgetting_replay:
        replays = tuple(float(r) for r in args.forgetting_replay.split(",") if r.strip())
    models = forgetting_mod.MODELS
    if args.forgetting_models:
        models = tuple(m for m in args.forgetting_models.split(",") if m)
    langs = ["en", *run.experts]
    return forgetting_mod.forgetting_rows(
        seeds[:1] if run.quick and not args.forgetting_seeds else seeds,
        lambda replay: forgetting_mod.debian_mixture(langs, replay),
        replays,
        models,
        experts_lr=args.experts_lr,
    )


def _run_forgetting(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    rows = _forgetting_rows(run, args)
    return _run_stages(run, args, "forgetting", rows, steps=100, curve_every=25)


def _run_stages(
    run: SimpleNamespace,
    args: argparse.Namespace,
    part: str,
    rows: list[dict[str, Any]],
    steps: int,
    curve_every: int,
) -> dict[str, Any]:
    """A part's rows merged, then trained in a router and an experts stage with held-out
    curves (``--<part>-router-steps``, ``-experts-steps``, ``-curve-every``; else ``steps``
    and ``curve_every``, 3 and 3 with ``--quick``), into ``<out>/<part>/<part>.json``."""
    log.info("%s: %d runs", part.capitalize(), len(rows))
    steps = 3 if run.quick else steps
    return trained_mod.run_trained(
        run.base_dir,
        run.experts,
        run.out / part,
        rows,
        router_steps=getattr(args, f"{part}_router_steps") or steps,
        experts_steps=getattr(args, f"{part}_experts_steps") or steps,
        **_training_settings(run, args),
        curve_every=getattr(args, f"{part}_curve_every") or (3 if run.quick else curve_every),
        curve_eval_tokens=128 if run.quick else 256,
        summary=f"{part}.json",
    )


def _run_collapse(run: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    return collapse_mod.run_collapse(
        run.base_dir,
        run.experts,
        run.out / "collapse",
        gate_modes=[m for m in args.collapse_modes.split(",") if m],
        seeds=run.collapse_seeds,
        steps=run.collapse_steps,
        batch_size=args.collapse_batch_size,
        seq_len=args.collapse_seq_len,
        learning_rate=args.collapse_lr,
        stage=args.collapse_stage,
        aux_loss_coefs=[float(c) for c in args.collapse_aux.split(",") if c.strip()],
        eval_tokens=args.collapse_eval_tokens or (256 if run.quick else 512),
        curve_eval_tokens=128 if run.quick else 256,
        resume=args.resume,
    )


if __name__ == "__main__":
    raise SystemExit(main())
