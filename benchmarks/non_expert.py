#!/usr/bin/env python3
"""What ``non_expert_merge`` costs: SmolLM2-135M-Instruct (bf16) and two sources, into a
3-expert Mixtral (base anchor + 2), bf16, saved to disk.

    PYTHONPATH=$PWD flock /tmp/moect-heavy.lock .venv/bin/python benchmarks/non_expert.py --rounds 5

The sources are SmolLM2 with every weight nudged by seeded noise (0.01 x the tensor's std), so
that every non-FFN tensor really differs; the timings do not depend on the values. Jobs, each a
whole process timed from spawn to exit (wall) with its peak RSS (``wait4``), interleaved for
``--rounds`` rounds (``benchmarks/run.py``'s ``interleaved``): the lean CLI (streaming) with
the non-expert weights of the base (today), simple-averaged, task arithmetic, and
simple-averaged attention only; the Python API ``run()`` with ``save_checkpoint`` with the
base's and with TIES (not elementwise: all at once, in memory). Prints the table (min / median
/ max, ratio of medians to the first row) and writes ``benchmarks/results/non_expert.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import MERGE_SIMPLE as SIMPLE  # noqa: E402
from helpers import MERGE_TASK_ARITHMETIC as TASK  # noqa: E402
from helpers import MERGE_TIES as TIES  # noqa: E402
from run import REPO, RESULTS, interleaved, smollm2_dir, summarize  # noqa: E402

PY = str(REPO / ".venv" / "bin" / "python")
#: Python API job: run() with save_checkpoint, then one JSON line with the record.
API = """
import json, sys
from fusion_bench.modelpool import CausalLMPool
from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
base, a, b, out, merge = sys.argv[1:6]
pool = CausalLMPool(models={"_pretrained_": base, "a": a, "b": b}, tokenizer=base)
moe = OrthogonalMoECTMergingAlgorithm(save_checkpoint=out, non_expert_merge=json.loads(merge)).run(pool)
print(json.dumps({"non_expert": moe.config.moe_ct.get("non_expert")}))
"""


def make_sources(base: Path, work: Path) -> list[Path]:
    """Two seeded 'fine-tunes' of ``base`` with every tensor nudged (made once)."""
    dirs = []
    for seed in (1, 2):
        out = work / f"source{seed}"
        dirs.append(out)
        if (out / "model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for key, tensor in load_file(base / "model.safetensors").items():
            noise = torch.randn(tensor.shape, generator=gen) * tensor.float().std() * 0.01
            state[key] = (tensor.float() + noise).to(tensor.dtype)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text((base / "config.json").read_text())
    return dirs


def jobs(base: Path, sources: list[Path], work: Path) -> dict:
    cli = [PY, "-m", "fusion_bench_moect.cli.upcycle", str(base)]
    srcs = [f"--source=a={sources[0]}", f"--source=b={sources[1]}", "-q"]

    def lean(name: str, *extra: str) -> tuple[list[str], Path, dict]:
        out = work / f"out-{name}"
        return [*cli, str(out), *srcs, *extra], out, {}

    def api(name: str, merge: object) -> tuple[list[str], Path, dict]:
        out = work / f"out-{name}"
        args = [str(base), str(sources[0]), str(sources[1]), str(out), json.dumps(merge)]
        return [PY, "-c", API, *args], out, {}

    return {
        "lean CLI, base (today)": lean("base"),
        "lean CLI, simple average": lean("avg", "--non-expert-merge", json.dumps(SIMPLE)),
        "lean CLI, task arithmetic 0.3": lean("ta", "--non-expert-merge", json.dumps(TASK)),
        "lean CLI, simple average, self_attn only": lean(
            "avg-attn",
            "--non-expert-merge",
            json.dumps(SIMPLE),
            "--non-expert-tensors",
            "self_attn",
        ),
        "run(), base (today)": api("api-base", "base"),
        "run(), TIES (in memory)": api("api-ties", TIES),
    }


def table(summary: dict) -> str:
    first = next(iter(summary.values()))
    rows = [
        "| job | wall min / median / max (s) | x first | peak RSS median (GB) | x first |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        w = s["wall"]
        rows.append(
            f"| {name} | {w['min']:.2f} / {w['median']:.2f} / {w['max']:.2f} | "
            f"{w['median'] / first['wall']['median']:.2f} | {s['peak_rss'] / 1e9:.2f} | "
            f"{s['peak_rss'] / first['peak_rss']:.2f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moect-non-expert"))
    args = parser.parse_args()
    base = smollm2_dir()
    sources = make_sources(base, args.work)
    runs = interleaved(jobs(base, sources, args.work), args.rounds, sync=True)
    summary = summarize(runs)
    print(table(summary))
    records = {name: r[-1].get("non_expert") for name, r in runs.items() if "non_expert" in r[-1]}
    print(json.dumps(records))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "non_expert.json").write_text(
        json.dumps({"rounds": args.rounds, "summary": summary, "records": records}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
