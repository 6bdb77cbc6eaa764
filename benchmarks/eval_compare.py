#!/usr/bin/env python3
"""lm-eval (through FusionBench's task pool) vs our ``moe_text_perplexity`` task pool on the
same text: the held-out Debian Reference chapters, SmolLM2-135M and its upcycled MoE.

    .venv/bin/python benchmarks/eval_compare.py [--languages en] [--window 2048] [--experts 8]

Prints a markdown table: per model and language, lm-eval's bits per byte and word
perplexity, and ours (token perplexity, and bits per byte computed from the same summed
negative log-likelihood over the text's UTF-8 bytes). Offline; runs on CPU in minutes.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fusion_bench.modelpool import CausalLMPool
from transformers import AutoModelForCausalLM

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.assets.smollm2 import default_model_dir
from fusion_bench_moect.data.text import load_debian_reference
from fusion_bench_moect.eval.lm_eval_taskpool import MoELMEvalHarnessTaskPool
from fusion_bench_moect.eval.taskpool import MoETextTaskPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default="en")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument(
        "--chapters", type=int, default=None, help="first N held-out chapters (default all 3)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = str(default_model_dir())
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=args.experts, dtype="float32").run(
        CausalLMPool(models={"_pretrained_": base}, tokenizer=base)
    )
    languages = args.languages.split(",")
    tmp_root = tempfile.mkdtemp(prefix="moect-evalcmp-")
    rows = []
    for label, model in (("SmolLM2-135M (dense)", dense), (f"Mixtral {args.experts}x top-2", moe)):
        theirs, lm_eval_s = _lm_eval(model, base, languages, args)
        texts, ours, ours_s = _ours(model, base, languages, args, Path(tmp_root))
        for lang in languages:
            text_bytes = sum(len(d.text.encode()) for d in texts[lang])
            src = ours[lang]
            our_bpb = src["mean_nll"] * src["scored_tokens"] / (text_bytes * math.log(2))
            lm = theirs[f"moect_debian_reference_{lang}"]
            rows.append(
                f"| {label} | {lang} | {lm['bits_per_byte']:.4f} | {lm['word_perplexity']:.2f} "
                f"| {our_bpb:.4f} | {src['perplexity']:.3f} | {src['scored_tokens']} "
                f"| {lm_eval_s:.0f} / {ours_s:.0f} |"
            )
            print(rows[-1], flush=True)
    print(
        f"Window {args.window} tokens, float32, held-out chapters 4, 8, 12.\n\n"
        "| model | lang | lm-eval bits/byte | lm-eval word ppl | ours bits/byte "
        "| ours token ppl | ours scored tokens | seconds (lm-eval / ours) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    print("\n".join(rows))
    shutil.rmtree(tmp_root, ignore_errors=True)


def _lm_eval(
    model: Any, base: str, languages: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], float]:
    """lm-eval's results per task, through FusionBench's task pool, and the seconds taken."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = MoELMEvalHarnessTaskPool(
            tasks=[f"moect_debian_reference_{lang}" for lang in languages],
            tokenizer=base,
            max_length=args.window,
            limit=args.chapters,
            output_path=tmp,
        ).evaluate(model)["results"]
    return results, time.perf_counter() - started


def _ours(
    model: Any, base: str, languages: list[str], args: argparse.Namespace, tmp_root: Path
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The same chapters as lm-eval's documents through ``MoETextTaskPool``: the texts, our
    per-source results, and the seconds taken."""
    started = time.perf_counter()
    texts = {lang: load_debian_reference(lang, "heldout")[: args.chapters] for lang in languages}
    files = {}
    for lang, docs in texts.items():
        files[lang] = tmp_root / f"{lang}.txt"
        files[lang].write_text("\n\n".join(d.text for d in docs))
    ours = MoETextTaskPool(
        sources={lang: str(path) for lang, path in files.items()},
        max_tokens_per_source=None,
        window_length=args.window,
        batch_size=1,
        tokenizer=base,
        reference_models=[],
        routing_stats=False,
        plots=False,
        show_progress=False,
    ).evaluate(model)["sources"]
    return texts, ours, time.perf_counter() - started


if __name__ == "__main__":
    main()
