#!/usr/bin/env python3
"""Do our outputs run in llama.cpp? Convert them with llama.cpp's own converter and compare
their llama.cpp perplexity with the dense model's.

    bash scripts/setup.sh --interop          # cmake, a compiler, sentencepiece (once)
    .venv/bin/python benchmarks/interop.py   # ~15-30 min on 2 cores the first time

1. Downloads the ``llama-cpp-python==0.3.36`` sdist with pip (it vendors llama.cpp under
   ``vendor/llama.cpp``) and builds ``llama-perplexity`` with cmake (CPU, Release, that
   target only), cached in ``~/.cache/fusion_bench_moect/llama.cpp`` (``$MOECT_LLAMA_CPP_DIR``
   to put it elsewhere).
2. Builds the outputs from SmolLM2-135M with the lean CLI (``python -m
   fusion_bench_moect.cli.upcycle``): Mixtral G=1 (8 experts), Mixtral G=4 (32 experts),
   Qwen2-MoE (tied base: explicit ``lm_head``), Qwen3-MoE G=8 (64 experts) from a Qwen3
   version of SmolLM2 (unit q/k norms: a different dense model, compared with its own
   conversion), and GLM4-MoE (8 experts, top-2, shared expert; with groups from SmolLM2, with
   q/k norms from the Qwen3 version).
3. Converts each (and the dense models) with the vendored ``convert_hf_to_gguf.py`` (run by
   the transformers-4 virtualenv, as llama.cpp pins transformers 4.57) to an f16 GGUF and
   runs ``llama-perplexity`` on the held-out Debian Reference chapters (English). The
   GLM4-MoE goes through our entry point ``python -m fusion_bench_moect.cli.convert_gguf``
   (the same converter, with SmolLM2's vocabulary handling: llama.cpp's GLM4-MoE class
   looks up GLM's special tokens).
4. Prints a markdown table (and writes it to ``benchmarks/results/interop-DATE.md``): each
   output's perplexity, the dense reference's, the relative difference, pass = within 0.5%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
VENV_TF4 = REPO / ".venv-tf4"
LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("FUSION_BENCH_MOECT_CACHE", Path.home() / ".cache/fusion_bench_moect"))
# Where the sdist is unpacked and llama-perplexity built: $MOECT_LLAMA_CPP_DIR (e.g. under /tmp
# on a shared machine), else the cache (fusion_bench_moect/assets/llama_cpp.py).
LLAMA_DIR = Path(os.environ.get("MOECT_LLAMA_CPP_DIR", CACHE / "llama.cpp"))
TOLERANCE = 0.005


def log(message: str) -> None:
    print(message, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        )
    return out


# -- llama.cpp ---------------------------------------------------------------------------


def llama_cpp_source() -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist (downloaded once with pip)."""
    sys.path.insert(0, str(REPO))
    from fusion_bench_moect.assets.llama_cpp import fetch_llama_cpp

    return fetch_llama_cpp(LLAMA_DIR)


def llama_perplexity(src: Path) -> Path:
    """Build (once) and return the ``llama-perplexity`` binary."""
    build = LLAMA_DIR / f"build-{LLAMA_CPP_PYTHON}"
    binary = build / "bin" / "llama-perplexity"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `bash scripts/setup.sh --interop` first.")
    log("== building llama-perplexity (CPU, Release; ~6 min on 2 idle cores)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(
        ["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release"]
        + ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        + ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    )
    jobs = str(os.cpu_count() or 2)
    run(["cmake", "--build", str(build), "--target", "llama-perplexity", "-j", jobs])
    return binary


def convert(src: Path, model_dir: Path, gguf: Path, outtype: str, base_arch: str | None) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py`` on ``model_dir``; given the dense base's
    architecture, through our entry point (``moect-convert-gguf``: the same converter, that
    base family's vocabulary for GLM4-MoE)."""
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    python = str(VENV_TF4 / "bin" / "python")
    if base_arch is not None:
        env["PYTHONPATH"] += os.pathsep + str(REPO)
        cmd = [python, "-m", "fusion_bench_moect.cli.convert_gguf", str(model_dir), str(gguf)]
        cmd += ["--outtype", outtype, "--llama-cpp", str(src), "--base-architecture", base_arch]
        run(cmd, env=env, cwd=REPO)
        return
    run(
        [python, str(src / "convert_hf_to_gguf.py"), str(model_dir)]
        + ["--outfile", str(gguf), "--outtype", outtype],
        env=env,
    )


def perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    threads = str(os.cpu_count() or 2)
    out = run(
        [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx)]
        + ["--chunks", str(chunks), "-t", threads, "-ngl", "0"]
    )
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"no perplexity in the output of {gguf.name}:\n{out.stderr[-3000:]}")
    return float(found.group(1))


# -- the models --------------------------------------------------------------------------


def smollm2_dir() -> Path:
    return CACHE / "SmolLM2-135M-Instruct"


def qwen3_from_smollm2(out: Path) -> Path:
    """SmolLM2's weights as a Qwen3 dense model (q/k norms of ones; no biases)."""
    script = """
import sys, torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
c = dense.config
config = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
    head_dim=c.hidden_size // c.num_attention_heads, rms_norm_eps=c.rms_norm_eps,
    max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
    rope_theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
    bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, attention_bias=False)
model = Qwen3ForCausalLM(config).to(torch.bfloat16)
missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
assert not unexpected and all("_norm" in k for k in missing), (missing, unexpected)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""
    if not (out / "config.json").is_file():
        run([str(VENV_TF4 / "bin" / "python"), "-c", script, str(smollm2_dir()), str(out)])
    return out


CASES = [
    # label, base ("smollm2" | "qwen3"), lean CLI flags
    (
        "Qwen2-MoE from a tied base, 8 experts, top-8, shared expert",
        "smollm2",
        ["--architecture", "qwen2_moe", "--num-experts", "8", "--experts-per-token", "8"],
    ),
    ("Mixtral, 8 experts (G=1), top-2", "smollm2", ["--num-experts", "8"]),
    (
        "Mixtral, 32 experts (G=4), top-8",
        "smollm2",
        ["--num-experts", "32", "--granularity", "4", "--experts-per-token", "8"],
    ),
    (
        "Qwen3-MoE, 64 experts (G=8), top-8",
        "qwen3",
        ["--num-experts", "64", "--granularity", "8", "--experts-per-token", "8"],
    ),
    # Converted with our entry point (llama.cpp's GLM4-MoE class wants GLM's tokenizer);
    # llama.cpp's glm4moe renormalises the top-k: a shared expert with top-k < E runs there.
    (
        "GLM4-MoE, 8 experts, top-2 in 2 of 4 groups, shared expert",
        "smollm2",
        ["--architecture", "glm4_moe", "--num-experts", "8", "--n-group", "4"]
        + ["--topk-group", "2"],
    ),
    # The same from a Qwen3 base: q/k norms in glm4moe, Qwen2's vocabulary path.
    (
        "GLM4-MoE with q/k norms, 8 experts, top-2, shared expert",
        "qwen3",
        ["--architecture", "glm4_moe", "--num-experts", "8"],
    ),
]


def heldout_text(path: Path, lang: str) -> Path:
    sys.path.insert(0, str(REPO))
    from fusion_bench_moect.data.text import load_debian_reference

    path.write_text("\n\n".join(d.text for d in load_debian_reference(lang, "heldout")))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outtype", default="f16", choices=("f16", "f32", "bf16"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40, help="ctx-token chunks scored")
    parser.add_argument("--lang", default="en")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--only", default=None, help="comma-separated case numbers (1-based)")
    args = parser.parse_args()

    started = time.perf_counter()
    src = llama_cpp_source()
    binary = llama_perplexity(src)
    work = Path(args.work or tempfile.mkdtemp(prefix="moect-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    text = heldout_text(work / f"heldout-{args.lang}.txt", args.lang)
    # Made when a case needs it (the Qwen3 version of SmolLM2 is a conversion of its own).
    bases = {"smollm2": smollm2_dir, "qwen3": lambda: qwen3_from_smollm2(work / "qwen3-dense")}
    cases = list(enumerate(CASES, 1))
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        cases = [(i, c) for i, c in cases if i in wanted]
    llama = SimpleNamespace(src=src, binary=binary, text=text, args=args)
    reference: dict[str, float] = {}
    try:
        rows = [run_case(llama, work, bases, reference, case) for _, case in cases]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(rows, args, time.perf_counter() - started)
    return 0 if all(r["ok"] for r in rows) else 1


def ppl_of(
    llama: SimpleNamespace, model_dir: Path, gguf: Path, base_arch: str | None = None
) -> float:
    """llama.cpp's perplexity of ``model_dir`` after its conversion to ``gguf`` (deleted)."""
    convert(llama.src, model_dir, gguf, llama.args.outtype, base_arch)
    ppl = perplexity(llama.binary, gguf, llama.text, llama.args.ctx, llama.args.chunks)
    gguf.unlink()
    return ppl


def run_case(
    llama: SimpleNamespace,
    work: Path,
    bases: dict[str, Callable[[], Path]],
    reference: dict[str, float],
    case: tuple[str, str, list[str]],
) -> dict[str, Any]:
    """One output of the lean CLI in llama.cpp, against its dense base (measured once)."""
    label, base_name, flags = case
    base = bases[base_name]()
    if base_name not in reference:
        reference[base_name] = ppl_of(llama, base, work / f"{base_name}-dense.gguf")
        log(f"  dense {base_name}: PPL {reference[base_name]:.4f}")
    out = work / "moe"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(VENV / "bin" / "python"), "-m", "fusion_bench_moect.cli.upcycle", str(base)]
    run(cmd + [str(out), "-q", *flags], cwd=REPO)
    base_arch = json.loads((base / "config.json").read_text())["architectures"][0]
    ppl = ppl_of(llama, out, work / "moe.gguf", base_arch if "glm4_moe" in flags else None)
    shutil.rmtree(out)
    diff = ppl / reference[base_name] - 1
    ok = abs(diff) <= TOLERANCE
    log(f"  {label}: PPL {ppl:.4f} ({diff:+.3%}) {'ok' if ok else 'FAIL'}")
    return {
        "label": label,
        "base": base_name,
        "flags": " ".join(flags),
        "ppl": ppl,
        "dense_ppl": reference[base_name],
        "diff": diff,
        "ok": ok,
    }


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    """Log the table and write it (Markdown) and the rows (JSON) to benchmarks/results/."""
    table = [
        f"llama.cpp {LLAMA_CPP_PYTHON} (llama-cpp-python sdist), {args.outtype} GGUF from its "
        f"convert_hf_to_gguf.py (GLM4-MoE through moect-convert-gguf), llama-perplexity "
        f"-c {args.ctx} --chunks {args.chunks} on the held-out Debian Reference ({args.lang}); "
        f"{seconds:.0f} s.",
        "",
        "| output (lean CLI flags) | dense base | llama.cpp PPL | dense PPL | difference | within 0.5% |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['label']} (`{r['flags']}`) | {r['base']} | {r['ppl']:.4f} "
            f"| {r['dense_ppl']:.4f} | {r['diff']:+.3%} | {'yes' if r['ok'] else '**no**'} |"
        )
    text_out = "\n".join(table)
    log("\n" + text_out)
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"interop-{stamp}.md").write_text(text_out + "\n")
    (results / f"interop-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
