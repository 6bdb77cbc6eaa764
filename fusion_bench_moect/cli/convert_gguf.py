"""Convert an output to GGUF with llama.cpp's own converter, keeping the base's vocabulary.

    python -m fusion_bench_moect.cli.convert_gguf MODEL_DIR OUT.gguf [--outtype f16]
        [--llama-cpp DIR | --fetch] [--base-architecture LlamaForCausalLM] [converter options]

(also the console script ``moect-convert-gguf``). It imports llama.cpp's
``convert_hf_to_gguf.py`` (nothing of it is copied here), changes one thing, and runs its
``main``: llama.cpp's GLM4-MoE converter class always sets the vocabulary with
``_set_vocab_glm``, which looks up GLM's special tokens (``[gMASK]``, ``<|user|>``,
``<|endoftext|>``, ``<|observation|>``) and fails with ``KeyError: '[gMASK]'`` on a GLM4-MoE
built from any other base. Here, when the tokenizer lacks those tokens, the vocabulary is set
by the converter class of the base's family instead (``--base-architecture``, default
``LlamaForCausalLM``: SmolLM2, Llama, Mistral), exactly as llama.cpp converts the dense base,
so the MoE's GGUF tokenises like the dense one's. A GLM tokenizer keeps GLM's own path, and
every other family converts as with ``convert_hf_to_gguf.py`` itself.

llama.cpp comes from ``--llama-cpp DIR`` (a checkout, or ``vendor/llama.cpp`` of the
``llama-cpp-python`` sdist), else from the sdist this package fetches (``--fetch``, once,
``assets/llama_cpp.py``). Run it with llama.cpp's Python requirements (transformers 4.57,
``gguf-py`` from the same tree, which the converter puts on ``sys.path``; ``sentencepiece``
for the Llama path). The GGUF is written beside ``OUT.gguf`` and renamed into place at the end.
Options not listed here (``--no-lazy``, ``--verbose``, ...) go to the converter unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from ..arch import ARCHITECTURES
from ..assets.llama_cpp import LlamaCppError, fetch_llama_cpp, vendored_source

log = logging.getLogger("fusion_bench_moect.convert_gguf")

#: The tokens ``_set_vocab_glm`` looks up by name (llama.cpp's conversion/base.py).
GLM_SPECIAL_TOKENS = ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")
#: Options that would make the converter write elsewhere than the file renamed into place.
_OWN_OUTPUT = ("--outfile", "--split-max-tensors", "--split-max-size", "--remote", "--vocab-only")


def build_parser() -> argparse.ArgumentParser:
    """The options of this command (the rest go to llama.cpp's converter)."""
    p = argparse.ArgumentParser(
        prog="python -m fusion_bench_moect.cli.convert_gguf",
        description="llama.cpp's convert_hf_to_gguf.py, with the base family's vocabulary for "
        "GLM4-MoE outputs of non-GLM bases. Unknown options go to the converter.",
    )
    p.add_argument("model", type=Path, help="the output directory (config.json, safetensors)")
    p.add_argument("outfile", type=Path, help="the GGUF file to write")
    p.add_argument("--outtype", default="f16", help="f32, f16, bf16, q8_0, ... (default f16)")
    p.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        help=f"llama.cpp's tree holding convert_hf_to_gguf.py (default {vendored_source()})",
    )
    p.add_argument(
        "--fetch", action="store_true", help="download llama-cpp-python's sdist if absent"
    )
    p.add_argument(
        "--base-architecture",
        default="LlamaForCausalLM",
        help="the dense base's architecture, whose vocabulary handling a GLM4-MoE without GLM's "
        "tokens gets (default LlamaForCausalLM)",
    )
    return p


def uses_glm_vocabulary(added_vocab: Mapping[str, int]) -> bool:
    """Whether a tokenizer's added tokens are GLM's, so that ``_set_vocab_glm`` applies."""
    return all(token in added_vocab for token in GLM_SPECIAL_TOKENS)


def vocabulary_entries(kv_data: Mapping[str, Any]) -> dict[str, Any]:
    """The GGUF metadata that describes the vocabulary: the ``tokenizer.*`` keys."""
    return {key: value for key, value in kv_data.items() if key.startswith("tokenizer.")}


def base_family_vocabulary(glm_set_vocab: Callable, base_class: type) -> Callable:
    """A ``set_vocab`` for llama.cpp's GLM4-MoE class: GLM's own for a GLM tokenizer, else the
    vocabulary that the base family's converter class writes for the same directory."""

    def set_vocab(self: Any) -> None:
        # Lazy: the converter's own environment (transformers 4.57), imported when it runs.
        from transformers import AutoTokenizer

        if uses_glm_vocabulary(AutoTokenizer.from_pretrained(self.dir_model).get_added_vocab()):
            return glm_set_vocab(self)
        log.info("No GLM special tokens: the vocabulary as %s writes it", base_class.__name__)
        # A converter of the base's class on the same directory, used for its vocabulary only:
        # its set_vocab runs on an instance of its own class (its __init__, its super()).
        donor = base_class(self.dir_model, self.ftype, self.fname_out, dry_run=True)
        donor.set_vocab()
        self.gguf_writer.kv_data[0].update(vocabulary_entries(donor.gguf_writer.kv_data[0]))

    return set_vocab


def load_converter(llama_cpp: Path) -> ModuleType:
    """Import ``convert_hf_to_gguf`` from ``llama_cpp`` (it adds its ``gguf-py`` itself)."""
    sys.path.insert(0, str(llama_cpp))
    import convert_hf_to_gguf  # llama.cpp's, found through the path just added

    return convert_hf_to_gguf


def model_class(converter: ModuleType, architecture: str) -> type:
    """llama.cpp's converter class registered for a Hugging Face architecture name."""
    # The conversion/ package imports each family's module on demand (get_model_class); a
    # single-file convert_hf_to_gguf.py (llama.cpp before 2026) has every class registered.
    lookup = getattr(converter, "get_model_class", None)
    return (
        lookup(architecture)
        if lookup
        else converter.ModelBase.from_model_architecture(architecture)
    )


def patch_vocabularies(converter: ModuleType, base_architecture: str) -> None:
    """Give llama.cpp's classes of the families that set a vocabulary of their own (GLM4-MoE)
    the base family's vocabulary path (this process only)."""
    try:
        base_class = model_class(converter, base_architecture)
    except NotImplementedError:
        raise SystemExit(
            f"error: llama.cpp's converter has no class for --base-architecture "
            f"{base_architecture}; pass the dense base's config.json 'architectures' entry"
        ) from None
    for family in ARCHITECTURES.values():
        if family.gguf_vocabulary_from_base:
            own = model_class(converter, family.model_class_name)
            own.set_vocab = base_family_vocabulary(own.set_vocab, base_class)


def resolve_llama_cpp(args: argparse.Namespace) -> Path:
    """The llama.cpp tree to import, fetched if asked; a one-line error if there is none."""
    if args.llama_cpp is not None:
        tree = args.llama_cpp.expanduser()
    elif args.fetch:
        try:
            tree = fetch_llama_cpp()
        except LlamaCppError as err:
            raise SystemExit(f"error: {err}") from None
    else:
        tree = vendored_source()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(
            f"error: no convert_hf_to_gguf.py in {tree}; pass --llama-cpp DIR (a llama.cpp "
            "checkout) or --fetch (downloads the llama-cpp-python sdist, 77 MB)"
        )
    return tree


def check_paths(args: argparse.Namespace, extra: list[str]) -> None:
    """Bad input, before anything is imported or written."""
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: {args.model} has no config.json; pass a model directory")
    if args.outfile.is_dir() or not args.outfile.parent.is_dir():
        raise SystemExit(f"error: {args.outfile} must be a file in an existing directory")
    if own := [a for a in extra if a.split("=")[0] in _OWN_OUTPUT]:
        raise SystemExit(f"error: {own[0]} is not supported here; run convert_hf_to_gguf.py")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m fusion_bench_moect.cli.convert_gguf MODEL OUT.gguf``."""
    args, extra = build_parser().parse_known_args(argv)
    check_paths(args, extra)
    tree = resolve_llama_cpp(args)
    converter = load_converter(tree)
    patch_vocabularies(converter, args.base_architecture)
    partial = args.outfile.with_name(f".{args.outfile.name}.partial")
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), str(args.model), "--outfile", str(partial)]
    sys.argv += ["--outtype", args.outtype, *extra]
    try:
        converter.main()  # exits (SystemExit) on its own errors
        os.replace(partial, args.outfile)
    finally:
        partial.unlink(missing_ok=True)
    print(args.outfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
