#!/usr/bin/env python3
"""Training memory at scale, on paper: parameters, trainable parameters per stage, and bytes
per GPU for weights + gradients + AdamW state under DDP and under FSDP2, computed from the code.

    .venv/bin/python benchmarks/at_scale.py            # print the table
    .venv/bin/python benchmarks/at_scale.py --write    # and put it into docs/training.md

The MoE of each base is made by the family's own ``build_config`` and instantiated on the meta
device (no memory); ``freeze.plan_training`` says what each stage trains, exactly as in a run.
Float32 master weights with bf16 compute: every weight is held in float32 (4 bytes), a
trainable one adds a float32 gradient (4) and AdamW's two moments (8). Under FSDP2 all three
are divided over the GPUs; the one decoder layer gathered at a time (bf16, doubled for
prefetching) is added. Activations are not counted: they depend on the batch and sequence.
"FSDP2, frozen bf16" keeps the frozen weights as a bf16 MoE stores them (2 bytes) and gives
float32 masters to the trainable ones only (``training.loading``). Host memory per node while
loading: 8 processes each loading the whole model in float32 through the model pool (DDP, and
FSDP2 before issue 27), against FSDP2's sharded load, where each process holds its rows of
one tensor at a time (at most the largest tensor in float32 over the node).
Trainable counts the stacked expert tensors whole: the anchor's rows get zero gradients but
hold gradient and AdamW memory like the others.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from transformers import LlamaConfig

from fusion_bench_moect.arch import resolve
from fusion_bench_moect.inspection import decoder_layers
from fusion_bench_moect.training.config import STAGES
from fusion_bench_moect.training.freeze import apply_requires_grad, plan_training

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BEGIN, END = "<!-- at-scale table: begin -->", "<!-- at-scale table: end -->"
GPUS, GPU_GB = 8, 80
BASES = {
    "Llama-3-8B": LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "Llama-3.2-1B": LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


def meta_moe(base: LlamaConfig, experts: int = 8, top_k: int = 2) -> torch.nn.Module:
    """The 8-expert top-2 Mixtral of ``base`` (expert 0 = the base FFN, the anchor)."""
    family = resolve("auto", base.model_type)
    config = family.build_config(base, experts, top_k, base.intermediate_size, torch.bfloat16)
    with torch.device("meta"):
        return family.model_class()(config)


def stage_row(name: str, model: torch.nn.Module, stage: str) -> dict:
    plan = plan_training(model, stage, anchors=[0])
    trainable = sum(p.numel() for p in apply_requires_grad(model, plan, stage))
    total = sum(p.numel() for p in model.parameters())
    layer = max(sum(p.numel() for p in lay.parameters()) for lay in decoder_layers(model))
    ddp = 4 * total + 12 * trainable
    fsdp = ddp / GPUS + 2 * 2 * layer
    # frozen weights as stored (bf16), float32 masters of the trainable ones only
    frozen_bf16 = (2 * (total - trainable) + 16 * trainable) / GPUS + 2 * 2 * layer
    need = next(n for n in range(1, 1025) if ddp / n + 4 * layer < GPU_GB * 1e9)
    # host memory of a node while loading: every process reading the whole model in float32
    # (the model pool), or each reading its rows of one tensor at a time (training.loading)
    largest = max(p.numel() for p in model.parameters())
    host_whole, host_sharded = GPUS * 4 * total, 4 * largest
    return {"base": name, "stage": stage, "total": total, "trainable": trainable,
            "ddp": ddp, "fsdp": fsdp, "frozen_bf16": frozen_bf16, "need": need,
            "host_whole": host_whole, "host_sharded": host_sharded}  # fmt: skip


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table() -> str:
    rows = [
        stage_row(name, model, stage)
        for name, base in BASES.items()
        for model in [meta_moe(base)]
        for stage in STAGES[:2]
    ]
    gb = 1e9
    lines = [
        f"| base -> 8 experts, top-2 | stage | parameters | trainable | DDP, per GPU | "
        f"FSDP2 over {GPUS} GPUs, per GPU | fits {GPU_GB} GB (DDP / FSDP2) | "
        f"GPUs FSDP2 needs under {GPU_GB} GB | FSDP2, frozen bf16, per GPU | "
        f"host memory per node while loading (whole model per process / sharded) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        fits = " / ".join("yes" if v / gb < GPU_GB else "no" for v in (r["ddp"], r["fsdp"]))
        lines.append(
            f"| {r['base']} | `{r['stage']}` | {count(r['total'])} | {count(r['trainable'])} | "
            f"{r['ddp'] / gb:.1f} GB | {r['fsdp'] / gb:.1f} GB | {fits} | {r['need']} | "
            f"{r['frozen_bf16'] / gb:.1f} GB | {r['host_whole'] / gb:.0f} GB / "
            f"{r['host_sharded'] / gb:.2f} GB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update docs/training.md")
    args = parser.parse_args()
    text = table()
    print(text, end="")
    if args.write:
        doc = DOC.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", doc))


if __name__ == "__main__":
    main()
