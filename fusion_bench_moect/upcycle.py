"""A lean command line for the pure job: dense safetensors directories in, MoE checkpoint out.

    python -m fusion_bench_moect.upcycle BASE_DIR OUT_DIR [--num-experts 8] [--gate-mode random]
    python -m fusion_bench_moect.upcycle BASE_DIR OUT_DIR --source math=DIR --source code=DIR

It runs the same engine as ``fusion_bench method=moe_ct_upcycling`` with ``streaming: true``
(``build.stream_moe_checkpoint``) and records the same ``moe_ct`` parameters in
``config.json``, but imports neither FusionBench nor transformers' modelling code: only torch,
safetensors and transformers' config classes. Those config classes alone take ~2.5 s to import
(transformers 5), so they load in a background thread while the tensors stream to disk from
the raw ``config.json``; the real configs are then checked against the raw values before the
checkpoint is moved into place. The tokenizer files of the base directory (or
``--tokenizer DIR``) are copied as they are.

Prompt-based gates (``hidden``, ``cheap_embed``) need the dense model and a tokenizer at
run time: use the FusionBench algorithm for those.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fusion_bench_moect.upcycle")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one option per parameter of ``MoECTConfig`` (its defaults)."""
    from .params import add_cli_options

    p = argparse.ArgumentParser(
        prog="python -m fusion_bench_moect.upcycle",
        description="Upcycle a dense model (or merge its fine-tunes) into an MoE checkpoint, "
        "streamed to disk shard by shard.",
    )
    p.add_argument("base", help="dense base model: a Hugging Face directory with safetensors")
    p.add_argument("output", help="checkpoint directory to write (atomically)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a fine-tune of the base as a source expert (repeat; the order is the expert order)",
    )
    add_cli_options(p)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="directory whose tokenizer files are copied (default BASE)",
    )
    p.add_argument(
        "--max-shard-size", type=float, default=2.0, help="largest shard in GB (default 2)"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _parse_sources(items: list[str]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--source expects NAME=DIR, got {item!r}.")
        if name in sources or name == "_pretrained_":
            raise ValueError(f"Source name {name!r} is used twice or reserved.")
        sources[name] = Path(path)
    return sources


def _vocab(directory: Path) -> Any:
    file = directory / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    return data.get("model", {}).get("vocab"), data.get("added_tokens")


#: Base config fields the engine reads; the raw ``config.json`` values are used while the
#: transformers config loads, then checked against it.
STRUCTURE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "tie_word_embeddings",
    "attention_bias",
    "use_sliding_window",
    "sliding_window",
)


class _ConfigLoader(threading.Thread):
    """Import transformers' config machinery and read the base config in the background."""

    def __init__(self, directory: str) -> None:
        super().__init__(name="moect-config-loader", daemon=True)
        self.directory = directory
        self.config: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(self.directory)
        except BaseException as err:  # re-raised in the main thread by result()
            self.error = err

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            from .io.sources import SourceError

            raise SourceError(
                f"Model '_pretrained_': cannot read {Path(self.directory) / 'config.json'} "
                f"({self.error})."
            ) from self.error
        return self.config


def _checked_base_config(loader: _ConfigLoader, raw: Any) -> Any:
    """The transformers base config, after checking that every field the engine took from
    the raw ``config.json`` has the same value there."""
    config = loader.result()
    for field in STRUCTURE_FIELDS:
        mine, theirs = getattr(raw, field, None), getattr(config, field, None)
        if field in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
            mine, theirs = bool(mine), bool(theirs)
        if mine != theirs:
            raise ValueError(
                f"The base's config.json gives {field}={mine!r} but transformers reads "
                f"{theirs!r}; use the FusionBench algorithm for this model."
            )
    return config


def upcycle(args: argparse.Namespace) -> list[float]:
    """Run the job described by parsed ``args``; returns the router condition numbers."""
    # Everything the main thread needs is imported before the loader thread starts, so the
    # two never import the same module at once.
    import torch  # noqa: F401
    from safetensors import safe_open  # noqa: F401

    from . import arch as arch_registry
    from .build import (
        check_compatible,
        output_config,
        prompt_free_router_rows,
        stream_moe_checkpoint,
    )
    from .io.checkpoint import check_destination
    from .io.lora import is_adapter_dir
    from .io.sources import (
        SourceError,
        is_safetensors_dir,
        open_adapter,
        open_directory,
        read_config_json,
        resolve_dtype,
    )
    from .io.streaming import write_hub_checkpoint  # noqa: F401
    from .ops.routers import condition_number  # noqa: F401
    from .params import config_from_args
    from .plan import make_plan

    config = config_from_args(args, save_checkpoint=args.output, streaming=True)
    check_destination(args.output, args.overwrite)
    source_dirs = _parse_sources(args.source)
    for name, directory in {"_pretrained_": Path(args.base), **source_dirs}.items():
        if name != "_pretrained_" and is_adapter_dir(directory):
            continue  # a PEFT LoRA adapter, checked when opened over the base
        if not is_safetensors_dir(directory):
            raise SourceError(
                f"Model '{name}': {directory} is not a Hugging Face directory with safetensors "
                "weights (model.safetensors or model.safetensors.index.json)"
                + (
                    " but a PEFT adapter; the base must be a full model"
                    if is_adapter_dir(directory)
                    else ""
                )
                + "."
            )
    raw = read_config_json("_pretrained_", args.base)
    missing = [f for f in STRUCTURE_FIELDS[:4] if not hasattr(raw, f)]
    if missing:
        raise SourceError(f"Model '_pretrained_': config.json has no {', '.join(missing)}.")
    loader = _ConfigLoader(str(args.base))
    loader.start()
    base = open_directory("_pretrained_", args.base, config=raw)
    sources = {}
    try:
        arch = arch_registry.resolve(args.architecture, base.config.model_type)
        base_vocab = _vocab(Path(args.base))
        for name, directory in source_dirs.items():
            if is_adapter_dir(directory):
                sources[name] = open_adapter(name, directory, base, Path(args.base))
            else:
                sources[name] = open_directory(
                    name, directory, config=read_config_json(name, directory)
                )
            check_compatible(base, sources[name])
            vocab = _vocab(directory)
            if base_vocab is not None and vocab is not None and vocab != base_vocab:
                raise SourceError(
                    f"Source '{name}' has a tokenizer whose vocabulary differs from the base; "
                    "experts must share the base tokenizer."
                )
        cfg = base.config
        plan = make_plan(
            config,
            architecture=arch.name,
            source_names=list(source_dirs),
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
        )
        dtype = resolve_dtype(args.dtype, base)
        log.info("%s", plan.describe(dtype))
        rows = prompt_free_router_rows(plan, cfg.num_hidden_layers, cfg.hidden_size)

        def final_config() -> Any:
            return output_config(plan, arch, _checked_base_config(loader, raw), dtype)

        return stream_moe_checkpoint(
            plan,
            arch,
            base,
            sources,
            rows,
            dtype,
            args.output,
            params=config.record(),
            tokenizer_dir=args.tokenizer or args.base,
            base_dir=args.base,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_size * 1e9),
            config=final_config,
        )
    finally:
        for src in (base, *sources.values()):
            src.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    try:
        conds = upcycle(args)
    except (ValueError, OSError) as err:  # SourceError and bad parameters are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info(
        "Wrote %s in %.1f s (router condition numbers %.4f..%.4f)",
        args.output,
        time.perf_counter() - start,
        min(conds),
        max(conds),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
