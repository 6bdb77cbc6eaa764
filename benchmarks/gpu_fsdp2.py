#!/usr/bin/env python3
"""bf16 FSDP2 on GPUs (issue 27 point 7): the SmolLM2 MoE trained with the shipped
``fabric=moe_fsdp2`` preset (``mixed_precision: auto`` = bf16 compute, float32 masters and
gradient reduction), both stages; tokens/s and peak GPU memory per stage. Not run yet: no
GPU was lent when it was written (docs/benchmarks.md).

    .venv/bin/python benchmarks/gpu_fsdp2.py --root /tmp/gpu          # every visible GPU

The model: SmolLM2-135M upcycled to 8 full-size experts, top-2, built in bf16
(``benchmarks/memory.py``'s ``build``), loaded sharded (frozen weights stay bf16). Each stage
trains ``--steps`` steps of ``--batch-size`` x ``--seq-len`` tokens per GPU on Debian's English
reference; tokens/s is the median of the steps after the first; peak memory is
``torch.cuda.max_memory_allocated`` of each rank (the largest is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import lightning as L
    import torch
    from fusion_bench.modelpool import CausalLMPool
    from hydra.utils import instantiate
    from memory import build
    from omegaconf import OmegaConf

    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    strategy = instantiate(OmegaConf.load(REPO / "config/fabric/strategy/moe_fsdp2.yaml"))
    fabric = L.Fabric(accelerator="cuda", devices=torch.cuda.device_count(), strategy=strategy,
                      precision="32-true")  # fmt: skip
    fabric.launch()
    args.root.mkdir(parents=True, exist_ok=True)
    if fabric.is_global_zero:
        build(args.root, "bfloat16")
    fabric.barrier()
    model_dir = str(args.root / "smollm2_moe8_bfloat16")
    for stage in ("router", "experts"):
        torch.cuda.reset_peak_memory_stats()
        algo = MoECTTrainingAlgorithm(
            train_sources={"en": {"debian_reference": "en", "split": "train"}}, stage=stage,
            max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
            log_every=5,
        )  # fmt: skip
        algo.fabric = fabric
        algo.run(CausalLMPool(models={"_pretrained_": model_dir}, tokenizer=model_dir))
        peak = torch.tensor(torch.cuda.max_memory_allocated(), device="cuda")
        peak = fabric.all_reduce(peak, reduce_op="max")
        speeds = [h["tokens_per_s"] for h in algo.history[1:]]
        if fabric.is_global_zero:
            print("RESULT " + json.dumps({
                "stage": stage, "gpus": fabric.world_size, "gpu": torch.cuda.get_device_name(),
                "tokens_per_s": statistics.median(speeds), "min": min(speeds),
                "max": max(speeds), "peak_gpu_gb": peak.item() / 1e9,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
