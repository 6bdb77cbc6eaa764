"""The measured jobs and the checks, one per sub-command; run by ``benchmarks/run.py`` inside
the right virtual environment (each in its own process, so its peak RSS is its own).

    python benchmarks/jobs.py ours-api BASE OUT EXPERTS [--streaming] [--granularity G] [--topk K]
                                       [--source NAME=DIR ...] [--touch]
    python benchmarks/jobs.py fusionbench BASE OUT EXPERTS      # in .venv-tf4
    python benchmarks/jobs.py make-qwen3 DIR
    python benchmarks/jobs.py make-llama1b DIR [--tokenizer DIR]   # Llama-3.2-1B shape, random
    python benchmarks/jobs.py make-finetunes BASE DIR N         # N fine-tune stand-ins
    python benchmarks/jobs.py check DENSE OUT [OUT ...]         # max |logit difference|

The job commands print one JSON line on stdout (``{"baseline_rss": ...}``): the peak RSS of
the interpreter once its imports are done, just before the work starts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

GPL = Path("/usr/share/common-licenses/GPL-3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ours_api(args: argparse.Namespace) -> None:
    """The plugin through its Python API: a CausalLMPool and ``run()``."""
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    sources = dict(entry.split("=", 1) for entry in args.source)
    has_tokenizer = any((Path(args.base) / f).is_file() for f in TOKENIZER_FILES)
    pool = CausalLMPool(
        models={"_pretrained_": args.base, **sources},
        tokenizer=args.base if has_tokenizer else None,
        model_kwargs={"dtype": "bfloat16"},
    )
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=None if sources else args.experts,
        experts_per_token=args.topk,
        granularity=args.granularity,
        gate_mode=args.gate_mode,
        dtype="bfloat16",
        save_checkpoint=args.out,
        streaming=args.streaming,
    )
    baseline = _peak_rss()
    model = algo.run(pool)
    if args.touch:
        _read_every_page(model)
    print(json.dumps({"baseline_rss": baseline}))


def _read_every_page(model) -> None:
    """Read one value per 4 KiB of every weight: what a first evaluation of the returned model
    costs in I/O (its weights are the written files, mapped)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            flat[:: max(1, 4096 // flat.element_size())].float().sum()


def fusionbench(args: argparse.Namespace) -> None:
    """FusionBench 0.2.33's own ``MixtralForCausalLMUpscalingAlgorithm`` (transformers 4.57)."""
    from fusion_bench.method import MixtralForCausalLMUpscalingAlgorithm
    from fusion_bench.modelpool import CausalLMPool

    pool = CausalLMPool(
        models={"_pretrained_": args.base},
        tokenizer=args.base,
        model_kwargs={"dtype": "bfloat16"},
    )
    algo = MixtralForCausalLMUpscalingAlgorithm(
        num_experts=args.experts, experts_per_token=args.topk, save_checkpoint=args.out
    )
    baseline = _peak_rss()
    algo.run(pool)
    print(json.dumps({"baseline_rss": baseline}))


def make_qwen3(args: argparse.Namespace) -> None:
    """A random Qwen3 base for the 128-expert fine-grained build (bf16, saved once): the tests'
    model factory (``tests/helpers.py``), seed 0, at a larger size."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_tiny_model

    out = Path(args.dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return
    model = make_tiny_model(
        "qwen3",
        layers=8,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    )
    model.to(torch.bfloat16).save_pretrained(out)


#: Llama-3.2-1B's shape with SmolLM2's vocabulary (so SmolLM2's tokenizer fits): 16 layers,
#: hidden 2048, FFN 8192, 32 heads over 8 KV heads, tied embeddings: 1.07B parameters.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama1b_specs() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the ``LLAMA_1B`` model, sorted as hub files are."""
    c = LLAMA_1B
    hidden, ffn, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    kv_rows = kv * c["head_dim"]
    specs = [
        ("model.embed_tokens.weight", (c["vocab_size"], hidden)),
        ("model.norm.weight", (hidden,)),
    ]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.v_proj.weight", (kv_rows, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
        ]
    return sorted(specs)


def make_llama1b(args: argparse.Namespace) -> None:
    """A dense Llama-3.2-1B-shaped model with random bf16 weights (2.15 GB, one file): every
    matrix N(0, 0.02) from its own seeded generator, norms 1, so the bytes are the same on
    every run. ``--tokenizer`` copies a tokenizer directory's files (SmolLM2's fits)."""
    import torch

    from fusion_bench_moect.io.streaming import ShardedSafetensorsWriter, copy_tokenizer_files

    out = Path(args.dir)
    if (out / "config.json").is_file():
        return
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    specs = [(name, shape, torch.bfloat16) for name, shape in llama1b_specs()]
    with ShardedSafetensorsWriter(tmp, specs, max_shard_bytes=1 << 40) as writer:
        for i, (name, shape, dtype) in enumerate(specs):
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=dtype)
            else:
                gen = torch.Generator().manual_seed(i)
                tensor = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            writer.write(name, tensor)
    (tmp / "config.json").write_text(json.dumps(LLAMA_1B, indent=2) + "\n")
    if args.tokenizer:
        copy_tokenizer_files(args.tokenizer, tmp)
    tmp.rename(out)


def make_finetunes(args: argparse.Namespace) -> None:
    """``N`` stand-ins for fine-tunes of BASE (bf16): its FFN weights plus seeded noise of 1 %
    of each tensor's std, saved with the tokenizer as ``DIR/ft1`` ... (the merge row times the
    work, which does not depend on what the fine-tunes learned)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    for i in range(1, args.n + 1):
        out = Path(args.dir) / f"ft{i}"
        if (out / "config.json").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    noise = torch.randn(param.shape, generator=gen) * param.float().std() * 0.01
                    param.add_(noise.to(param.dtype))
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(args.base) / name).is_file():
                shutil.copyfile(Path(args.base) / name, out / name)


def check(args: argparse.Namespace) -> None:
    """Max |logit difference| of each MoE output to the dense model, float32 compute, on real
    text (Debian's GPL-3) or, without a tokenizer, on fixed random token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    dense_dir = Path(args.dense)
    if (dense_dir / "tokenizer.json").is_file() and GPL.is_file():
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        ids = tokenizer(GPL.read_text()[:2000], return_tensors="pt").input_ids[:, : args.tokens]
    else:
        config = json.loads((dense_dir / "config.json").read_text())
        ids = torch.randint(0, config["vocab_size"], (1, args.tokens))

    def logits(directory: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(ids).logits
        del model
        return out

    reference = logits(args.dense)
    results = {}
    for directory in args.outputs:
        try:
            diff = (logits(directory) - reference).abs().max().item()
            results[directory] = diff
        except Exception as err:  # report, do not stop the other checks
            results[directory] = f"error: {type(err).__name__}: {str(err)[:200]}"
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("ours-api", "fusionbench"):
        p = sub.add_parser(name)
        p.add_argument("base")
        p.add_argument("out")
        p.add_argument("experts", type=int)
        p.add_argument("--topk", type=int, default=2)
        p.add_argument("--granularity", type=int, default=1)
        p.add_argument("--gate-mode", default="random")
        p.add_argument("--streaming", action="store_true")
        p.add_argument("--touch", action="store_true", help="then read every weight once")
        p.add_argument("--source", action="append", default=[], help="NAME=DIR, repeatable")
    p = sub.add_parser("make-qwen3")
    p.add_argument("dir")
    p = sub.add_parser("make-llama1b")
    p.add_argument("dir")
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied")
    p = sub.add_parser("make-finetunes")
    p.add_argument("base")
    p.add_argument("dir")
    p.add_argument("n", type=int)
    p = sub.add_parser("check")
    p.add_argument("dense")
    p.add_argument("outputs", nargs="+")
    p.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    {
        "ours-api": ours_api,
        "fusionbench": fusionbench,
        "make-qwen3": make_qwen3,
        "make-llama1b": make_llama1b,
        "make-finetunes": make_finetunes,
        "check": check,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
