#!/usr/bin/env python3
"""Step checkpoints of moe_ct_training: size and write time per stage, this code and an older one.

    .venv/bin/python benchmarks/step_checkpoints.py
    git worktree add /tmp/before d61d82a   # the trainer before lean step checkpoints
    .venv/bin/python benchmarks/step_checkpoints.py --before /tmp/before

The model: SmolLM2-135M-Instruct upcycled by ``OrthogonalMoECTMergingAlgorithm(num_experts=4,
experts_per_token=2, dtype="float32")`` (built once under ``--root`` by this checkout's code).
For each stage (``router``, ``experts``) and each code (``after``: this checkout; ``before``:
the checkout given by ``--before``, run with it first on ``PYTHONPATH``) a fresh process trains
``--steps`` optimiser steps with ``checkpoint_every=1`` (1 process, ``32-true`` on the CPU,
batch 2 x 64 tokens, AdamW) and times every step checkpoint's write: the call of
``training.checkpoints.save_step`` where the code has it, else the trainer's ``_save_step``
method (d61d82a: the whole model as ``model.safetensors`` + ``trainer_state.ckpt``). Dirty
pages are flushed (``os.sync``) before each write; ``write`` is the call alone (into the page
cache, as a training run waits for it), ``+ sync`` adds flushing what it wrote to disk.
Per stage: the step directory's bytes and files, write times, trainable parameters and
trainable parameters x 12 bytes (float32 weight + AdamW's two moments), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training import smollm2_moe  # benchmarks/training.py, beside this script

REPO = Path(__file__).resolve().parents[1]
STAGES = ("router", "experts")


def prepare(root: Path) -> Path:
    """The 4-expert SmolLM2 MoE with full-size experts."""
    return smollm2_moe(root / "smollm2_moe4")


def _describe(target: Path, write: float, module) -> dict:
    started = time.perf_counter()
    os.sync()
    files = {f.name: f.stat().st_size for f in sorted(target.iterdir()) if f.is_file()}
    params = list({id(p): p for p in module.parameters()}.values())
    return {
        "step": target.name,
        "write_s": write,
        "write_sync_s": write + time.perf_counter() - started,
        "bytes": sum(files.values()),
        "files": files,
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "parameters": sum(p.numel() for p in params),
    }


def time_step_writes(records: list[dict]) -> str:
    """Wrap the step-checkpoint writer of the code on the path; append one record per write."""
    from fusion_bench_moect import training

    checkpoints = getattr(training, "checkpoints", None)
    if checkpoints is not None and hasattr(checkpoints, "save_step"):
        original = checkpoints.save_step

        def save_step(fabric, config, run, position):
            os.sync()
            started = time.perf_counter()
            target = original(fabric, config, run, position)
            records.append(_describe(target, time.perf_counter() - started, run.module))
            return target

        checkpoints.save_step = save_step  # the trainer calls it through the module
        return "checkpoints.save_step"
    cls = training.MoECTTrainingAlgorithm
    old = cls._save_step

    def _save_step(self, model, optimizer, scheduler, tokenizer, position, *rest):
        os.sync()
        started = time.perf_counter()
        old(self, model, optimizer, scheduler, tokenizer, position, *rest)
        target = self._checkpoint_root() / f"step-{position['step']:06d}"
        records.append(_describe(target, time.perf_counter() - started, model))

    cls._save_step = _save_step
    return "MoECTTrainingAlgorithm._save_step"


def worker(args) -> None:
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    records: list[dict] = []
    writer = time_step_writes(records)
    algo = MoECTTrainingAlgorithm(
        train_sources={"en": {"debian_reference": "en", "split": "train"}},
        stage=args.worker, max_steps=args.steps, batch_size=2, seq_len=64,
        learning_rate=1e-4, lr_scheduler="constant", max_tokens_per_source=20_000,
        log_every=10**9, checkpoint_every=1, checkpoint_dir=str(args.out), accelerator="cpu",
    )  # fmt: skip
    model = str(args.model)
    algo.run(CausalLMPool(models={"_pretrained_": model}, tokenizer=model,
                          model_kwargs={"dtype": "float32"}))  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"writer": writer, "writes": records, "peak_rss": rss}))


def run_worker(args, stage: str, code: str, pythonpath: Path, model: Path) -> dict:
    """One stage in a fresh process with ``pythonpath`` first; its step directories removed."""
    out = args.root / f"steps-{code}-{stage}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, __file__, "--worker", stage, "--model", str(model),
           "--out", str(out), "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=args.root, env=env)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{code} {stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def report(results: dict[tuple[str, str], dict]) -> None:
    print("| stage | code | trainable parameters | x 12 bytes | step directory | files "
          "| write, s (each step) | write + sync, s | peak RSS, GiB |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (stage, code), result in results.items():
        writes = result["writes"]
        last = writes[-1]
        files = ", ".join(f"{n} {_size(b)}" for n, b in last["files"].items())
        times = " / ".join(f"{w['write_s']:.2f}" for w in writes)
        synced = " / ".join(f"{w['write_sync_s']:.2f}" for w in writes)
        print(f"| {stage} | {code} | {last['trainable']:,} | {_size(last['trainable'] * 12)} "
              f"| {_size(last['bytes'])} | {files} | {times} | {synced} "
              f"| {result['peak_rss'] / 2**30:.2f} |")  # fmt: skip
    print()
    for (stage, code), result in results.items():
        last = result["writes"][-1]
        ratio = last["bytes"] / (last["trainable"] * 12)
        print(f"{stage} {code}: {last['bytes']:,} bytes = {ratio:.3f} x (trainable x 12 bytes) "
              f"of a model of {last['parameters']:,} parameters")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="checkout of the older code (d61d82a)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--root", type=Path, default=Path(tempfile.gettempdir()) / "moect_ckpt_bench"
    )
    parser.add_argument("--worker", choices=STAGES)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    model = prepare(args.root)
    codes = [("before", args.before.absolute())] if args.before else []
    codes.append(("after", REPO))
    results = {}
    for stage in STAGES:
        for code, path in codes:
            results[stage, code] = result = run_worker(args, stage, code, path, model)
            print(f"{stage} {code}: {json.dumps(result)}", flush=True)
    print()
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
