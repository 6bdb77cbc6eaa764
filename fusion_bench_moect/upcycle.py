"""Kept so that ``python -m fusion_bench_moect.upcycle`` still works: the lean CLI lives in
``fusion_bench_moect/cli/upcycle.py``."""

from __future__ import annotations

import sys

from .cli.upcycle import build_parser, main, upcycle

__all__ = ["build_parser", "main", "upcycle"]

if __name__ == "__main__":
    sys.exit(main())
