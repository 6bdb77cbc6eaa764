#!/usr/bin/env python3
"""Training throughput and peak memory: moe_ct_training vs FusionBench's FullFinetuneSFT.

    .venv/bin/python benchmarks/training.py                 # 5 rounds, ~5 min on 2 idle CPU cores
    .venv/bin/python benchmarks/training.py --rounds 5 --steps 3 --seq-len 64

The same job for every row: SmolLM2-135M-Instruct upcycled to 4 half-size experts (granularity 2, top-2, float32),
the English train chapters of the Debian Reference packed into windows of ``--seq-len``
tokens, micro-batches of ``--batch-size`` windows, AdamW (lr 1e-4), clipping at 1.0,
``32-true`` precision on the CPU, ``--steps`` optimiser steps. Rows:

* ``moe_ct_training, 1 process``: stage ``experts`` (routers + the non-anchor experts).
* ``FullFinetuneSFT, 1 process``: FusionBench's reference loop on the same model and windows
  (it trains every weight but the embeddings; its own collate pads and masks).
* ``moe_ct_training, 2 DDP processes``: gloo, the same per-process batch (twice the global one).

Each run is a fresh process (``--worker``); tokens/s counts the tokens of the optimiser
steps over the time of the training loop alone (model loading and data packing excluded),
summed over processes; peak RSS is the largest ``ru_maxrss`` of the run's processes (and
the sum for DDP). Rows are interleaved for ``--rounds`` rounds; min / median / max per row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ("ours", "fullfinetune_sft", "ours_ddp2")
LABELS = {
    "ours": "moe_ct_training, 1 process",
    "fullfinetune_sft": "FusionBench FullFinetuneSFT, 1 process",
    "ours_ddp2": "moe_ct_training, 2 DDP processes (gloo)",
}


def prepare(root: Path) -> Path:
    """The 4-expert SmolLM2 MoE (float32), built once."""
    target = root / "smollm2_moe4"
    if (target / "config.json").exists():
        return target
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
    from fusion_bench_moect.assets.smollm2 import default_model_dir

    base = str(default_model_dir())
    OrthogonalMoECTMergingAlgorithm(
        architecture="mixtral", num_experts=4, granularity=2, experts_per_token=2, dtype="float32",
        save_checkpoint=str(target),
    ).run(CausalLMPool(models={"_pretrained_": base}, tokenizer=base))  # fmt: skip
    return target


def _windows(tokenizer, args):
    from fusion_bench_moect.training.data import load_windows

    windows, _ = load_windows(
        tokenizer, {"en": {"debian_reference": "en", "split": "train"}}, args.seq_len,
        args.max_tokens,
    )  # fmt: skip
    return windows


def run_ours(args, fabric) -> float:
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    seconds = []

    class Timed(MoECTTrainingAlgorithm):
        def _train(self, *a, **k):
            fabric.barrier()
            started = time.perf_counter()
            super()._train(*a, **k)
            fabric.barrier()
            seconds.append(time.perf_counter() - started)

    algo = Timed(
        train_sources={"en": {"debian_reference": "en", "split": "train"}},
        stage="experts", max_steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=1e-4, lr_scheduler="constant",
        max_tokens_per_source=args.max_tokens, log_every=10**9,
    )  # fmt: skip
    algo.fabric = fabric
    model_dir = str(args.model)
    algo.run(CausalLMPool(models={"_pretrained_": model_dir}, tokenizer=model_dir,
                          model_kwargs={"dtype": "float32"}))  # fmt: skip
    return seconds[0]


def run_fullfinetune_sft(args, fabric) -> float:
    import functools
    import typing

    import typing_extensions

    # fusion_bench.method.lm_finetune imports typing.override, which Python < 3.12 lacks
    typing.override = getattr(typing, "override", typing_extensions.override)
    from fusion_bench.dataset.llama.collate import padded_collate_sft
    from fusion_bench.method.lm_finetune.fullfinetune_sft import FullFinetuneSFT
    from fusion_bench.modelpool import CausalLMPool
    from torch.utils.data import DataLoader

    class Bench(FullFinetuneSFT):
        def setup_data(self):
            windows = _windows(self.tokenizer, args)
            rows = [
                {"input_ids": w.tolist(), "attention_mask": [1] * len(w), "labels": w.tolist()}
                for w in windows.long()
            ]
            loader = DataLoader(rows, batch_size=args.batch_size, shuffle=True,
                                collate_fn=functools.partial(
                                    padded_collate_sft, pad_token_id=self.tokenizer.pad_token_id))  # fmt: skip
            self.train_dataloader = self.fabric.setup_dataloaders(loader)

        def conditional_checkpoint_save(self, *a, **k):  # not part of the measured job
            pass

    algo = Bench(
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.0},
        # a constant rate, as ours (its loop needs a scheduler object)
        lr_scheduler={"_target_": "torch.optim.lr_scheduler.ConstantLR", "factor": 1.0},
        dataloader_kwargs={}, max_epochs=1, max_steps=args.steps,
        gradient_clip_val=1.0,
    )  # fmt: skip
    algo.fabric = fabric
    model_dir = str(args.model)
    algo.modelpool = CausalLMPool(models={"_pretrained_": model_dir}, tokenizer=model_dir,
                                  model_kwargs={"dtype": "float32"})  # fmt: skip
    algo.setup()
    started = time.perf_counter()
    algo.train(algo.model, algo.optimizer, algo.lr_scheduler)
    return time.perf_counter() - started


def worker(args) -> None:
    import lightning as L
    import torch

    devices = 2 if args.worker == "ours_ddp2" else 1
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      precision="32-true")  # fmt: skip
    fabric.launch()
    run = run_fullfinetune_sft if args.worker == "fullfinetune_sft" else run_ours
    seconds = run(args, fabric)
    tokens = args.steps * args.batch_size * args.seq_len * fabric.world_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered = [rss]
    if fabric.world_size > 1:
        gathered = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, rss)
    if fabric.is_global_zero:
        print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds,
                                      "peak_rss": max(gathered), "total_rss": sum(gathered)}))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=20_000)
    parser.add_argument(
        "--root", type=Path, default=Path(tempfile.gettempdir()) / "moect_train_bench"
    )
    parser.add_argument("--worker", choices=ROWS)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    model = prepare(args.root)
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    for round_ in range(1, args.rounds + 1):
        for row in ROWS:
            cmd = [sys.executable, __file__, "--worker", row, "--model", str(model),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.root,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results[row].append(json.loads(lines[-1][len("RESULT ") :]))
            r = results[row][-1]
            print(f"round {round_} {row}: {r['tokens_per_s']:.1f} tokens/s, "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    base = statistics.median(r["tokens_per_s"] for r in results["fullfinetune_sft"])
    print(f"\nSmolLM2-135M -> 4 half-size experts (top-2, float32), CPU, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens per process, {args.rounds} rounds\n")  # fmt: skip
    print(
        "| run | tokens/s min / median / max | vs FullFinetuneSFT | peak RSS per process (GiB) min / median / max |"
    )
    print("| --- | --- | --- | --- |")
    for row in ROWS:
        tps = [r["tokens_per_s"] for r in results[row]]
        rss = [r["peak_rss"] / 2**30 for r in results[row]]
        print(f"| {LABELS[row]} | {min(tps):.0f} / {statistics.median(tps):.0f} / {max(tps):.0f} "
              f"| {statistics.median(tps) / base:.2f}x "
              f"| {min(rss):.2f} / {statistics.median(rss):.2f} / {max(rss):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
