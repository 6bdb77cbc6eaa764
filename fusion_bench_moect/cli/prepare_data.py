"""``moect-prepare-data``: build the token stores of ``moe_ct_training``'s sources ahead of a run.

The stores are those a training run with the same sources, tokenizer, ``data_cache_dir`` and
``max_tokens_per_source`` opens (see ``data/store.py``); building them here (e.g. once per
machine before a multi-GPU job) keeps the job's start to seconds. Sources are given as
``NAME=SPEC``, SPEC a path / glob or a YAML mapping as in ``train_sources``::

    moect-prepare-data --tokenizer ~/.cache/fusion_bench_moect/SmolLM2-135M-Instruct \\
        'de={debian_reference: de, weight: 0.4}' 'notes=/data/notes/*.txt'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from ..data.documents import TrainingDataError


def parse_source(item: str) -> tuple[str, Any]:
    """``NAME=SPEC`` as (name, spec); SPEC is YAML when it is a mapping."""
    name, sep, spec = item.partition("=")
    if not sep or not name:
        raise TrainingDataError(
            f"A source is NAME=SPEC (e.g. de='{{debian_reference: de}}'), got {item!r}."
        )
    return name, yaml.safe_load(spec) if spec.lstrip().startswith("{") else spec


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints one JSON line per store (its path and counts)."""
    parser = argparse.ArgumentParser(prog="moect-prepare-data", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="NAME=SPEC", help="a training source")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (the model's)")
    parser.add_argument("--data-cache-dir", default=None, help="as data_cache_dir (default: cache)")
    parser.add_argument("--max-tokens-per-source", type=int, default=None, help="as the parameter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoTokenizer  # keeps --help fast

    from ..training.data import open_training_data  # imports torch

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        sources = dict(parse_source(item) for item in args.sources)
        data = open_training_data(
            tokenizer, sources, 1, args.data_cache_dir, args.max_tokens_per_source
        )
    except (ValueError, OSError) as err:  # bad sources, a full disk: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, store in data.stores.items():
        meta = store.meta
        print(json.dumps({"source": name, "store": str(store.path), "tokens": meta["tokens"],
                          "documents": meta["read"]["documents"]}))  # fmt: skip
    return 0
