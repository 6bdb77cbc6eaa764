#!/usr/bin/env python3
"""Training throughput and memory: moe_ct_training (1 process, 2 DDP, 2 FSDP2 processes, each
transformers-5 experts implementation) vs FusionBench's FullFinetuneSFT.

    .venv/bin/python benchmarks/training.py            # 5 rounds of every row
    .venv/bin/python benchmarks/training.py --rounds 5 --impl-rounds 3 --threads 1   # 18 min
    .venv/bin/python benchmarks/training.py --rows impl_eager,impl_batched_mm,impl_grouped_mm \
        --rounds 2 --threads 2                         # the experts kernels alone, 2 threads

The job of the main rows: SmolLM2-135M-Instruct upcycled to 4 half-size experts (granularity
2, top-2, float32), the English train chapters of the Debian Reference packed into windows of
``--seq-len`` tokens, micro-batches of ``--batch-size`` windows, AdamW (lr 1e-4), clipping at
1.0, ``32-true`` precision on the CPU, ``--steps`` optimiser steps. Rows:

* ``ours``: moe_ct_training, 1 process, stage ``experts`` (routers + the non-anchor experts),
  transformers' default experts kernel (grouped_mm).
* ``fullfinetune_sft``: FusionBench's reference loop on the same model and windows, 1 process
  (it trains every weight but the embeddings; its own collate pads and masks).
* ``ours_ddp2``: 2 DDP processes (gloo), the same per-process batch (twice the global one).
* ``ours_fsdp2``: 2 FSDP2 processes, the shipped strategy (config/fabric/strategy/
  moe_fsdp2.yaml, instantiated by hydra as ``fabric=moe_fsdp2`` does), batches as DDP.
* ``impl_eager``, ``impl_batched_mm``, ``impl_grouped_mm``: ``ours`` with that
  ``experts_implementation``, on ``--impl-batch-size`` x ``--impl-seq-len`` tokens per step
  (batched_mm gathers a copy of the expert weights per token and slot: ~0.3 GB per token here,
  so 128 tokens per step would need ~40 GB).

Each run is a fresh process (``--worker``) under an address-space limit (``--max-memory-gib``,
so that a run that blows up fails alone on a shared machine); ``--threads`` sets
``OMP_NUM_THREADS`` for every process (Lightning sets 1 per process for DDP / FSDP2 when it is
unset). Tokens/s counts the tokens of the optimiser steps over the time of the training loop
alone (model loading and data packing excluded), summed over processes; peak RSS is the
largest ``ru_maxrss`` of the run's processes, RSS after training the largest ``VmRSS`` after
the loop, before and after ``malloc_trim`` (which returns freed heap memory to the system). Held bytes are counted from the tensors just
before the last optimiser step (``--steps`` >= 2, so AdamW's state exists): every parameter,
every gradient, every optimiser state tensor, the local shard of a DTensor (``to_local()``),
on the rank that holds most. The 1-process runs of moe_ct_training save their trained weights
the first time (``reference-ROW.safetensors`` under ``--root``) and compare every later run with
them (bit-identical or not, max |diff|). Rows are interleaved for ``--rounds`` rounds (the
``impl_*`` rows for the first ``--impl-rounds``); min / median / max per row.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("eager", "batched_mm", "grouped_mm")
LABELS = {
    "ours": "moe_ct_training, 1 process",
    "fullfinetune_sft": "FusionBench FullFinetuneSFT, 1 process",
    "ours_ddp2": "moe_ct_training, 2 DDP processes (gloo)",
    "ours_fsdp2": "moe_ct_training, 2 FSDP2 processes (gloo, fabric=moe_fsdp2)",
}
ROWS = tuple(LABELS) + tuple(f"impl_{i}" for i in IMPLS)


def smollm2_moe(target: Path, **params: Any) -> Path:
    """SmolLM2-135M upcycled to 4 float32 experts, top-2 (with ``params``), built once."""
    if (target / "config.json").exists():
        return target
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
    from fusion_bench_moect.assets.smollm2 import default_model_dir

    base = str(default_model_dir())
    OrthogonalMoECTMergingAlgorithm(
        num_experts=4, experts_per_token=2, dtype="float32", save_checkpoint=str(target), **params
    ).run(CausalLMPool(models={"_pretrained_": base}, tokenizer=base))
    return target


def prepare(root: Path) -> Path:
    """The 4-expert SmolLM2 MoE with half-width experts (granularity 2)."""
    return smollm2_moe(root / "smollm2_moe4", architecture="mixtral", granularity=2)


def _windows(tokenizer, args):
    from fusion_bench_moect.training.data import load_windows

    windows, _ = load_windows(
        tokenizer, {"en": {"debian_reference": "en", "split": "train"}}, args.seq_len,
        args.max_tokens,
    )  # fmt: skip
    return windows


def held_bytes(run) -> dict[str, int]:
    """Bytes of parameters, gradients and optimiser state this process holds (local shards)."""
    import torch

    from fusion_bench_moect.training.sharding import local

    def size(tensor) -> int:
        part = local(tensor)
        return part.numel() * part.element_size()

    params = list({id(p): p for p in run.module.parameters()}.values())
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(size(v) for v in states),
    }


def measure_loop(fabric, measured: dict) -> None:
    """Time the training loop; count the bytes held just before each optimiser step."""
    from fusion_bench_moect.training.loop import TrainingLoop

    train, optimizer_step = TrainingLoop.train, TrainingLoop._optimizer_step

    def timed_train(self, position):
        fabric.barrier()
        started = time.perf_counter()
        train(self, position)
        fabric.barrier()
        measured["seconds"] = time.perf_counter() - started

    def counted_step(self, step):
        measured["held"], measured["run"] = held_bytes(self.run), self.run
        optimizer_step(self, step)

    TrainingLoop.train, TrainingLoop._optimizer_step = timed_train, counted_step


def compare_reference(run, path: Path) -> dict:
    """Save the trained weights the first time; later, compare with them."""
    import torch
    from safetensors.torch import load_file, save_file

    trained = {
        n: p.detach().contiguous() for n, p in run.module.named_parameters() if n in run.trainable
    }
    if not path.exists():
        save_file(trained, str(path))
        return {"reference": "written"}
    saved = load_file(str(path))
    return {
        "reference": "compared",
        "identical": all(torch.equal(saved[n], t) for n, t in trained.items()),
        "max_abs_diff": max(float((saved[n] - t).abs().max()) for n, t in trained.items()),
    }


def run_ours(args, fabric, impl: str | None) -> tuple[float, dict]:
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    measured: dict = {}
    measure_loop(fabric, measured)
    algo = MoECTTrainingAlgorithm(
        train_sources={"en": {"debian_reference": "en", "split": "train"}},
        stage="experts", max_steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=1e-4, lr_scheduler="constant",
        max_tokens_per_source=args.max_tokens, log_every=10**9, experts_implementation=impl,
    )  # fmt: skip
    algo.fabric = fabric
    model_dir = str(args.model)
    model = algo.run(CausalLMPool(models={"_pretrained_": model_dir}, tokenizer=model_dir,
                                  model_kwargs={"dtype": "float32"}))  # fmt: skip
    extra = {"held": measured["held"]}
    if fabric.world_size == 1:
        extra["impl"] = getattr(model.config, "_experts_implementation", None)
        reference = args.root / f"reference-{args.worker}.safetensors"
        extra.update(compare_reference(measured["run"], reference))
    return measured["seconds"], extra


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


def fsdp2_strategy():
    """The shipped FSDP2 strategy, instantiated by hydra as ``fabric=moe_fsdp2`` does."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(REPO / "config/fabric/strategy/moe_fsdp2.yaml"))


def worker(args) -> None:
    import lightning as L
    import torch

    strategy = {"ours_ddp2": "ddp", "ours_fsdp2": fsdp2_strategy}.get(args.worker, "auto")
    devices = 1 if strategy == "auto" else 2
    fabric = L.Fabric(accelerator="cpu", devices=devices,
                      strategy=strategy() if callable(strategy) else strategy,
                      precision="32-true")  # fmt: skip
    fabric.launch()
    if args.worker == "fullfinetune_sft":
        seconds, extra = run_fullfinetune_sft(args, fabric), {}
    else:
        impl = args.worker[len("impl_") :] if args.worker.startswith("impl_") else None
        seconds, extra = run_ours(args, fabric, impl)
    tokens = args.steps * args.batch_size * args.seq_len * fabric.world_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = (rss, _current_rss(trim=False), _current_rss(trim=True), extra.get("held"))
    gathered = [mine]
    if fabric.world_size > 1:
        gathered = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, mine)
    if fabric.is_global_zero:
        if extra.get("held"):  # the rank holding most
            extra["held"] = max((g[-1] for g in gathered), key=lambda h: sum(h.values()))
        rss = [g[0] for g in gathered]
        print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds,
                                      "peak_rss": max(rss), "total_rss": sum(rss),
                                      "end_rss": max(g[1] for g in gathered),
                                      "trimmed_rss": max(g[2] for g in gathered), **extra}))  # fmt: skip


def _current_rss(trim: bool) -> int:
    """This process's resident set now (after training), in bytes; with ``trim``, after glibc
    has returned the heap memory that was freed but kept for reuse (``malloc_trim``)."""
    if trim:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _limit_memory(gib: float):
    def limit() -> None:
        size = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return limit


def run_row(args, row: str, model: Path) -> dict:
    """One run of ``row`` in a fresh process (and its Fabric launcher's children)."""
    impl = row.startswith("impl_")
    batch, seq = (
        (args.impl_batch_size, args.impl_seq_len) if impl else (args.batch_size, args.seq_len)
    )
    cmd = [sys.executable, __file__, "--worker", row, "--model", str(model),
           "--steps", str(args.steps), "--batch-size", str(batch), "--seq-len", str(seq),
           "--max-tokens", str(args.max_tokens), "--root", str(args.root)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.root, env=env,
                         preexec_fn=_limit_memory(args.max_memory_gib))  # fmt: skip
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        errors = [x for x in out.stderr.splitlines() if "Error" in x or "error" in x]
        sys.exit(f"{row} failed (exit {out.returncode}):\n" + "\n".join(errors[-20:]))
    return json.loads(lines[-1][len("RESULT ") :])


def _spread(values: list[float], fmt: str = ".0f") -> str:
    return " / ".join(f"{v:{fmt}}" for v in (min(values), statistics.median(values), max(values)))


def _median_tps(results: dict[str, list[dict]], row: str) -> float | None:
    runs = results.get(row)
    return statistics.median(r["tokens_per_s"] for r in runs) if runs else None


def report_throughput(results: dict[str, list[dict]]) -> None:
    base = _median_tps(results, "fullfinetune_sft")
    print("| run | tokens/s min / median / max | vs FullFinetuneSFT | "
          "peak RSS per process (GiB) min / median / max | RSS after training (GiB, median) "
          "| the same, heap trimmed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for row in (r for r in LABELS if results.get(r)):
        tps = [r["tokens_per_s"] for r in results[row]]
        rss = [r["peak_rss"] / 2**30 for r in results[row]]
        end = statistics.median(r["end_rss"] / 2**30 for r in results[row])
        trimmed = statistics.median(r["trimmed_rss"] / 2**30 for r in results[row])
        ratio = f"{statistics.median(tps) / base:.2f}x" if base else "-"
        print(f"| {LABELS[row]} | {_spread(tps)} | {ratio} | {_spread(rss, '.2f')} | {end:.2f} "
              f"| {trimmed:.2f} |")  # fmt: skip


def report_memory(results: dict[str, list[dict]]) -> None:
    ddp = results.get("ours_ddp2")
    ddp = sum(ddp[-1]["held"].values()) if ddp else None
    print("| run | parameters | gradients | AdamW state | together, per process | vs DDP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in (r for r in ("ours", "ours_ddp2", "ours_fsdp2") if results.get(r)):
        held = results[row][-1]["held"]  # counted from tensors: the same in every round
        parts = [f"{held[k] / 2**30:.3f} GiB" for k in ("parameters", "gradients", "optimizer")]
        total = sum(held.values())
        ratio = f"{total / ddp:.2f}x" if ddp else "-"
        print(f"| {LABELS[row]} | {' | '.join(parts)} | {total / 2**30:.3f} GiB | {ratio} |")


def report_impls(results: dict[str, list[dict]]) -> None:
    base = _median_tps(results, "impl_grouped_mm")
    print("| experts_implementation | runs | tokens/s min / median / max | vs grouped_mm "
          "| peak RSS, GiB (median) | later runs bit-identical to the first "
          "| max abs diff to the first |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in (f"impl_{i}" for i in IMPLS):
        runs = results.get(row)
        if not runs:
            continue
        tps = [r["tokens_per_s"] for r in runs]
        rss = statistics.median(r["peak_rss"] / 2**30 for r in runs)
        later = [r for r in runs if r["reference"] == "compared"]
        same = sum(r["identical"] for r in later)
        diff = max((r["max_abs_diff"] for r in later), default=float("nan"))
        ratio = f"{statistics.median(tps) / base:.2f}x" if base else "-"
        print(f"| {runs[0]['impl']} | {len(runs)} | {_spread(tps, '.1f')} | {ratio} | {rss:.2f} "
              f"| {same} of {len(later)} | {diff:.3g} |")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--impl-rounds", type=int, help="rounds with the impl_* rows (all)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--impl-batch-size", type=int, default=1)
    parser.add_argument("--impl-seq-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=20_000)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--max-memory-gib", type=float, default=16.0)
    parser.add_argument(
        "--root", type=Path, default=Path(tempfile.gettempdir()) / "moect_train_bench"
    )
    parser.add_argument("--worker", choices=ROWS)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (AdamW's state exists from the second step)")
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    model = prepare(args.root)
    for old in args.root.glob("reference-*.safetensors"):  # each benchmark compares its own runs
        old.unlink()
    impl_rounds = args.rounds if args.impl_rounds is None else args.impl_rounds
    rows = [r for r in ROWS if r in args.rows.split(",")]
    results: dict[str, list[dict]] = {row: [] for row in rows}
    started = time.perf_counter()
    for round_ in range(1, args.rounds + 1):
        for row in rows:
            if row.startswith("impl_") and round_ > impl_rounds:
                continue
            results[row].append(r := run_row(args, row, model))
            print(f"round {round_} {row}: {json.dumps(r)}", flush=True)
    print(f"\nSmolLM2-135M -> 4 half-size experts (top-2, float32), CPU, stage experts, "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens per process "
          f"(experts kernels: {args.impl_batch_size} x {args.impl_seq_len}), {args.rounds} rounds "
          f"({impl_rounds} for the kernels), OMP_NUM_THREADS={args.threads or 'unset'}, "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    for report in (report_throughput, report_memory, report_impls):
        report(results)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
