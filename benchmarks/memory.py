#!/usr/bin/env python3
"""Host memory of ``moe_ct_training`` through the ``fusion_bench`` CLI: peak RSS per process
and summed over the processes, during load, train and save, sampled from outside (psutil).

    flock /tmp/moect-heavy.lock .venv/bin/python benchmarks/memory.py --root /tmp/memory
    # the same runs with another checkout's package first on PYTHONPATH (e.g. main):
    flock /tmp/moect-heavy.lock .venv/bin/python benchmarks/memory.py --root /tmp/memory \\
        --code main=/work/main --code branch=.

The model: SmolLM2-135M upcycled to 8 full-size experts, top-2
(``OrthogonalMoECTMergingAlgorithm(num_experts=8, experts_per_token=2)``, 0.69B parameters),
built once per ``--builds`` dtype under ``--root``. Each run trains ``--steps`` optimiser
steps (batch 1 x ``--seq-len`` tokens of Debian's English reference, 32-true on the CPU) and
saves the model; the pool loads in float32 (``modelpool.model_kwargs.dtype=float32``, the
documented setting). Rows: ``1`` (one process), ``ddp2`` (``fabric=moe_ddp``, 2 processes),
``fsdp2`` (``fabric=moe_fsdp2``, 2 processes). Phases, from the run's own output: load = start
to the first step line; train = to the last step line; save = to exit (the final save,
gathering included).
Every ``--interval`` seconds the RSS of every process of the run's tree is read; per phase the
table gives the largest process's peak and the peak of the sum.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "1": ["fabric.devices=1"],
    "ddp2": ["fabric=moe_ddp", "fabric.precision=32-true", "fabric.devices=2"],
    "fsdp2": ["fabric=moe_fsdp2", "fabric.devices=2"],
}
PHASES = ("load", "train", "save")


def build(root: Path, dtype: str) -> Path:
    """SmolLM2-135M with 8 full-size experts in ``dtype``, built once."""
    target = root / f"smollm2_moe8_{dtype}"
    if (target / "config.json").exists():
        return target
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
    from fusion_bench_moect.assets.smollm2 import default_model_dir

    base = str(default_model_dir())
    OrthogonalMoECTMergingAlgorithm(
        num_experts=8, experts_per_token=2, dtype=dtype, save_checkpoint=str(target)
    ).run(CausalLMPool(models={"_pretrained_": base}, tokenizer=base))
    return target


def command(args, model: Path, row: str, stage: str, out: Path) -> list[str]:
    fusion_bench = str(Path(sys.executable).parent / "fusion_bench")
    return [fusion_bench, "method=moe_ct_training", f"method.stage={stage}",
            f"method.max_steps={args.steps}", "method.batch_size=1",
            f"method.seq_len={args.seq_len}", "method.log_every=1",
            "method.max_tokens_per_source=20000", f"method.save_checkpoint={out}",
            "method.overwrite=true", "modelpool=CausalLMPool/moe_ct_upcycle",
            f"modelpool.models._pretrained_={model}", f"modelpool.tokenizer={model}",
            "modelpool.model_kwargs.dtype=float32", "taskpool=dummy",
            "fabric.accelerator=cpu", "fabric.loggers=null",
            f"hydra.run.dir={out}-logs", *ROWS[row]]  # fmt: skip


def measure(cmd: list[str], env: dict, steps: int, interval: float) -> dict:
    """Run ``cmd``; the peak RSS per process and summed, per phase."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    state = {"phase": "load"}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if state["phase"] == "load" and "step 1:" in line:
                state["phase"] = "train"
            if state["phase"] == "train" and f"step {steps}:" in line:  # then the save
                state["phase"] = "save"

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks = {p: {"process": 0, "sum": 0} for p in PHASES}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak = peaks[state["phase"]]
            peak["process"] = max(peak["process"], max(rss))
            peak["sum"] = max(peak["sum"], sum(rss))
        time.sleep(interval)
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError("".join(lines[-40:]))
    return peaks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/memory"))
    parser.add_argument("--builds", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--stages", nargs="+", default=["router"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--code", action="append", default=None,
                        help="NAME=CHECKOUT, first on PYTHONPATH (default: this one)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--results", default="memory.json", help="raw records, under --root")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    codes = dict(c.split("=", 1) for c in (args.code or [f"branch={REPO}"]))
    models = {dtype: build(args.root, dtype) for dtype in args.builds}
    results = []
    for rnd in range(args.rounds):
        for dtype, stage, row, (name, checkout) in [
            (d, s, r, c)
            for d in args.builds
            for s in args.stages
            for r in args.rows
            for c in codes.items()
        ]:  # fmt: skip  (interleaved: every variant once per round)
            out = args.root / f"out-{name}-{dtype}-{stage}-{row}"
            env = {**os.environ, "PYTHONPATH": str(Path(checkout).absolute()),
                   "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
            cmd = command(args, models[dtype], row, stage, out)
            peaks = measure(cmd, env, args.steps, args.interval)
            record = {"round": rnd, "code": name, "build": dtype, "stage": stage, "row": row,
                      "peaks": peaks}  # fmt: skip
            print("RESULT " + json.dumps(record), flush=True)
            results.append(record)
    (args.root / args.results).write_text(json.dumps(results, indent=1))
    report(results)
    return 0


def report(results: list[dict]) -> None:
    """One row per variant: the median over rounds, with min-max where rounds differ."""
    gb = 1e9
    rounds = len({r["round"] for r in results})
    print(f"{rounds} round(s); median (min-max) of the rounds")
    print("| code | build | stage | processes | load: per process / sum | train | save | "
          "whole run per process |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    variants: dict[tuple, list[dict]] = {}
    for r in results:
        variants.setdefault((r["code"], r["build"], r["stage"], r["row"]), []).append(r["peaks"])

    def cell(values: list[float]) -> str:
        values = sorted(v / gb for v in values)
        median = statistics.median(values)
        spread = f" ({values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
        return f"{median:.2f}{spread}"

    for (code, build, stage, row), peaks in variants.items():
        cells = [f"{cell([p[ph]['process'] for p in peaks])} / "
                 f"{cell([p[ph]['sum'] for p in peaks])} GB" for ph in PHASES]  # fmt: skip
        whole = cell([max(p[ph]["process"] for ph in PHASES) for p in peaks])
        print(f"| {code} | {build} | `{stage}` | {row} | {' | '.join(cells)} | {whole} GB |")


if __name__ == "__main__":
    sys.exit(main())
