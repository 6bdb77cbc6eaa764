"""Max |logit| difference between SmolLM2-135M and its upcycled MoE, per architecture and dtype.

Usage: python benchmarks/logit_diff.py [--only sources]   (after scripts/setup.sh; about 2
minutes on 2 cores)

Prints pure upcycling (E=8), MoE-CT with alpha = 0 (one FFN-perturbed source), fine-grained
Mixtral (E=16, G=8, top-8), and for scale the dense bf16 vs dense float32 difference; then,
in float32, the sources of issue 12: a LoRA adapter trained with PEFT for a few steps against
the same adapter merged by PEFT (MoE vs MoE), a base-only shared expert and moe_layers (every
other layer) with pure upcycling (MoE vs dense).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from fusion_bench.modelpool import CausalLMPool
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.assets.smollm2 import prepare_smollm2


def build(arch: str, dtype: str, models: dict, **params) -> torch.nn.Module:
    algo = OrthogonalMoECTMergingAlgorithm(architecture=arch, dtype=dtype, **params)
    return algo.run(CausalLMPool(models=models, tokenizer=None))


def max_diff(model: torch.nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids).logits.float() - reference).abs().max().item()


def source_cases(base: str, ids: torch.Tensor) -> None:
    """Issue 12, float32: LoRA adapter vs PEFT-merged; base-only shared expert; moe_layers."""
    from peft import LoraConfig, get_peft_model

    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = dense(ids).logits.float()
    layers = dense.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(dense, lora)
        optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            peft_model(input_ids=ids, labels=ids).loss.backward()
            optim.step()
            optim.zero_grad()
        peft_model.save_pretrained(f"{tmp}/adapter")
        peft_model.merge_and_unload().save_pretrained(f"{tmp}/merged")
        params = {"alpha_strategy": "constant", "base_alpha": 0.8}
        from_adapter = build(
            "mixtral", "float32", {"_pretrained_": base, "ft": f"{tmp}/adapter"}, **params
        )
        with torch.no_grad():
            expected = from_adapter(ids).logits.float()
        from_merged = build(
            "mixtral", "float32", {"_pretrained_": base, "ft": f"{tmp}/merged"}, **params
        )
        diff = max_diff(from_merged, expected, ids)
        print(
            f"{'LoRA adapter vs PEFT-merged':<28} {'mixtral':<10} float32   max |logit diff| = {diff:.3g}"
        )
    cases = [
        ("base-only shared expert", {"num_experts": 8, "shared_experts": ["_pretrained_"]}),
        ("moe_layers every other", {"num_experts": 8, "moe_layers": list(range(0, layers, 2))}),
    ]
    for label, params in cases:
        diff = max_diff(
            build("qwen2_moe", "float32", {"_pretrained_": base}, **params), reference, ids
        )
        print(f"{label:<28} {'qwen2_moe':<10} float32   max |logit diff| = {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("sources",), help="run only the issue-12 source cases")
    args = parser.parse_args()
    base = str(prepare_smollm2())
    tok = AutoTokenizer.from_pretrained(base)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:3000]
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    if args.only != "sources":
        function_preservation(base, ids)
    source_cases(base, ids)


def function_preservation(base: str, ids: torch.Tensor) -> None:
    """Pure upcycling, MoE-CT at alpha 0 and fine-grained experts against the dense base."""
    with tempfile.TemporaryDirectory() as tmp:
        source = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in source.named_parameters():
                if ".mlp." in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 1e-3)
        source.save_pretrained(tmp)
        dense = {}
        for dtype in ("float32", "bfloat16"):
            model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).eval()
            with torch.no_grad():
                dense[dtype] = model(ids).logits.float()
            cases = [
                ("pure upcycling E=8", "mixtral", {"num_experts": 8}, {"_pretrained_": base}),
                ("pure upcycling E=8", "qwen2_moe", {"num_experts": 8}, {"_pretrained_": base}),
                (
                    "MoE-CT alpha=0",
                    "mixtral",
                    {"base_alpha": 0.0},
                    {"_pretrained_": base, "ft": tmp},
                ),
                (
                    "MoE-CT alpha=0",
                    "qwen2_moe",
                    {"base_alpha": 0.0},
                    {"_pretrained_": base, "ft": tmp},
                ),
                (
                    "fine-grained E=16 G=8 top-8",
                    "mixtral",
                    {"num_experts": 16, "granularity": 8, "experts_per_token": 8},
                    {"_pretrained_": base},
                ),
            ]
            for label, arch, params, models in cases:
                diff = max_diff(build(arch, dtype, models, **params), dense[dtype], ids)
                print(f"{label:<28} {arch:<10} {dtype:<9} max |logit diff| = {diff:.3g}")
        scale = (dense["float32"] - dense["bfloat16"]).abs().max().item()
        print(f"{'dense bf16 vs dense float32':<49} max |logit diff| = {scale:.3g}")


if __name__ == "__main__":
    main()
