"""``python -m fusion_bench_moect.cli.leaderboard``: a grid of ``fusion_bench`` runs, ranked.

See ``fusion_bench_moect/eval/leaderboard.py`` and docs/leaderboard.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ..eval.leaderboard import build_rows, row_command, run_leaderboard, slug


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see ``eval/leaderboard.py``'s docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench_moect.cli.leaderboard",
        description="Run a grid of fusion_bench settings and rank them.",
    )
    parser.add_argument("--modelpool", required=True, help="modelpool config, e.g. smollm2_upcycle")
    parser.add_argument(
        "--taskpool", required=True, help="taskpool config, e.g. moe_text_perplexity"
    )
    parser.add_argument("--method", default="moe_ct_upcycling", help="method config")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid axis (repeatable)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every row"
    )
    parser.add_argument("--baseline", action="store_true", help="add the dense method=dummy row")
    parser.add_argument(
        "--metric", default="overall_perplexity", help="dotted report path to rank by"
    )
    parser.add_argument("--higher-is-better", action="store_true", help="rank descending")
    parser.add_argument("--out", default="outputs/leaderboard", help="output folder")
    parser.add_argument("--resume", action="store_true", help="reuse finished rows in --out")
    parser.add_argument("--title", default=None, help="Markdown title")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        rows = build_rows(args.method, args.grid, args.set, args.baseline)
        for index, row in enumerate(rows):
            run_dir = Path(args.out).resolve() / "runs" / slug(index, row.name)
            print(shlex.join(row_command(row, args.modelpool, args.taskpool, run_dir)))
        return 0
    passed = ("modelpool", "taskpool", "out", "method", "grid", "baseline", "metric")
    passed += ("higher_is_better", "resume", "title")
    ranked, files = run_leaderboard(fixed=args.set, **{k: getattr(args, k) for k in passed})
    print(files["md"].read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 1 if any(r.status == "failed" for r in ranked) else 0


if __name__ == "__main__":
    sys.exit(main())
