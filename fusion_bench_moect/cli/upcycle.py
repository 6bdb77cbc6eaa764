"""A lean command line for the pure job: dense safetensors directories in, MoE checkpoint out.

    moect-upcycle BASE_DIR OUT_DIR [--num-experts 8] [--gate-mode random]
    moect-upcycle BASE_DIR OUT_DIR --source math=DIR --source code=DIR

(also ``python -m fusion_bench_moect.cli.upcycle``). It runs the same
pipeline as ``fusion_bench method=moe_ct_upcycling`` with ``streaming: true``
(``pipeline.run_pipeline``) and records the same ``moe_ct`` parameters in
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
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..params import add_cli_options, config_from_args
from ..schema import expand_path

# A fixed name: under ``python -m`` __name__ is "__main__", and the log lines show the name.
log = logging.getLogger("fusion_bench_moect.upcycle")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one option per parameter of ``MoECTConfig`` (its defaults)."""
    p = argparse.ArgumentParser(
        prog="moect-upcycle",
        description="Upcycle a dense model (or merge its fine-tunes) into an MoE checkpoint, "
        "streamed to disk shard by shard (also: python -m fusion_bench_moect.cli.upcycle).",
    )
    p.add_argument(
        "base",
        type=expand_path,
        metavar="BASE",
        help="dense base model: a Hugging Face directory with safetensors",
    )
    p.add_argument(
        "output",
        type=expand_path,
        metavar="OUTPUT",
        help="checkpoint directory to write (atomically)",
    )
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
        type=expand_path,
        metavar="DIR",
        help="directory whose tokenizer files are copied (default BASE)",
    )
    p.add_argument(
        "--max-shard-size",
        type=float,
        default=2.0,
        metavar="GB",
        help="largest shard in GB (default 2)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="warnings and errors only: no INFO lines, no bars",
    )
    return p


def _parse_sources(items: list[str]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--source expects NAME=DIR, got {item!r}.")
        if name in sources or name == "_pretrained_":
            raise ValueError(f"Source name {name!r} is used twice or reserved.")
        sources[name] = Path(expand_path(path))
    return sources


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
            # Lazy: the point of this thread is to import transformers (~2.5 s) off the main one.
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(self.directory)
        except BaseException as err:  # re-raised in the main thread by result()
            self.error = err

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            # Lazy: io.sources imports torch; upcycle() has loaded it by the time this runs.
            from ..io.sources import SourceError

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


def _check_inputs(dirs: dict[str, Path], tokenizer: str | None) -> None:
    """Every model directory (and ``--tokenizer``) exists, is readable and is a full model
    with safetensors weights (a source may be a PEFT LoRA adapter)."""
    # Lazy, as in upcycle(), which calls this after its own imports.
    from ..io.lora import is_adapter_dir
    from ..io.sources import SourceError, check_local_path, is_safetensors_dir
    from ..io.streaming import TOKENIZER_FILES

    for name, directory in dirs.items():
        check_local_path(f"Model '{name}'", directory, ("config.json", "adapter_config.json"))
        if name != "_pretrained_" and is_adapter_dir(directory):
            continue  # a PEFT LoRA adapter, checked when opened over the base
        if not is_safetensors_dir(directory):
            adapter = " but a PEFT adapter; the base must be a full model"
            raise SourceError(
                f"Model '{name}': {directory} is not a Hugging Face directory with safetensors "
                "weights (model.safetensors or model.safetensors.index.json)"
                + (adapter if is_adapter_dir(directory) else "")
                + "."
            )
    if tokenizer:
        check_local_path("--tokenizer", tokenizer, TOKENIZER_FILES)


def upcycle(args: argparse.Namespace) -> list[float]:
    """Run the job described by parsed ``args``; returns the router condition numbers."""
    # Lazy, so that --help and bad options answer before torch (~2 s); all before the loader
    # thread starts, so that the two threads never import the same module at once.
    from ..build import output_config as moe_config
    from ..io.lora import is_adapter_dir, open_adapter
    from ..io.sources import SourceError, open_directory, read_config_json
    from ..io.streaming import write_hub_checkpoint  # noqa: F401
    from ..non_expert import import_algorithm
    from ..pipeline import ModelInputs, run_pipeline

    config = config_from_args(args, save_checkpoint=args.output, streaming=True)
    if isinstance(config.non_expert_merge, dict):
        # FusionBench imports transformers, as the loader thread does: both here, before the
        # thread starts, so that the two threads never import the same module at once.
        from transformers import AutoConfig  # noqa: F401

        import_algorithm(config.non_expert_merge["_target_"])
    dirs = {"_pretrained_": Path(args.base), **_parse_sources(args.source)}
    _check_inputs(dirs, args.tokenizer)
    raw = read_config_json("_pretrained_", args.base)
    missing = [f for f in STRUCTURE_FIELDS[:4] if not hasattr(raw, f)]
    if missing:
        raise SourceError(f"Model '_pretrained_': config.json has no {', '.join(missing)}.")
    loader = _ConfigLoader(str(args.base))
    loader.start()

    def open_model(name: str, base: Any) -> Any:
        if base is not None and is_adapter_dir(dirs[name]):
            return open_adapter(name, dirs[name], base, Path(args.base))
        cfg = raw if name == "_pretrained_" else read_config_json(name, dirs[name])
        return open_directory(name, dirs[name], config=cfg)

    def output_config(plan: Any, arch: Any, dtype: Any) -> Any:
        return moe_config(plan, arch, _checked_base_config(loader, raw), dtype)

    inputs = ModelInputs(
        source_names=[n for n in dirs if n != "_pretrained_"],
        open=open_model,
        directory=dirs.get,
        tokenizer_dir=Path(args.tokenizer or args.base),
        output_config=output_config,
        max_shard_bytes=int(args.max_shard_size * 1e9),
    )
    return run_pipeline(config, inputs).condition_numbers


#: How the shared pipeline's messages name a parameter, and how this command line does.
CLI_WORDS = {"save_checkpoint=": "OUTPUT=", "set overwrite: true": "pass --overwrite"}


def in_cli_words(message: str) -> str:
    """A pipeline error as this command line says it (its arguments, not the YAML keys)."""
    for key, word in CLI_WORDS.items():
        message = message.replace(key, word)
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    try:
        conds = upcycle(args)
    except (ValueError, OSError) as err:  # SourceError and bad parameters are ValueErrors
        print(f"error: {in_cli_words(str(err))}", file=sys.stderr)
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
