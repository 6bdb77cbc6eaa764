"""Max |logit| difference between SmolLM2-135M and its upcycled MoE, per architecture and dtype.

Usage: python benchmarks/logit_diff.py   (after scripts/setup.sh; about 2 minutes on 2 cores)

Prints pure upcycling (E=8), MoE-CT with alpha = 0 (one FFN-perturbed source), fine-grained
Mixtral (E=16, G=8, top-8), and for scale the dense bf16 vs dense float32 difference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from fusion_bench.modelpool import CausalLMPool
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.assets.smollm2 import prepare_smollm2


def main() -> None:
    base = str(prepare_smollm2())
    tok = AutoTokenizer.from_pretrained(base)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:3000]
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
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
                moe = OrthogonalMoECTMergingAlgorithm(architecture=arch, dtype=dtype, **params).run(
                    CausalLMPool(models=models, tokenizer=None)
                )
                with torch.no_grad():
                    diff = (moe(ids).logits.float() - dense[dtype]).abs().max().item()
                print(f"{label:<28} {arch:<10} {dtype:<9} max |logit diff| = {diff:.3g}")
        scale = (dense["float32"] - dense["bfloat16"]).abs().max().item()
        print(f"{'dense bf16 vs dense float32':<49} max |logit diff| = {scale:.3g}")


if __name__ == "__main__":
    main()
