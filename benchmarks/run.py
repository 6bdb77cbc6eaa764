#!/usr/bin/env python3
"""Side-by-side benchmark: this plugin vs mergekit-moe vs FusionBench's own Mixtral upcycling.

    python3 benchmarks/run.py                 # set up (idempotent), compare, scale: ~10-15 min
    python3 benchmarks/run.py --only compare  # the side-by-side table only
    python3 benchmarks/run.py --only scaling  # the scaling table only
    python3 benchmarks/run.py --only large    # the 1B-shape table (13.4 GB per run, ~25 min)

The same job for every tool: SmolLM2-135M-Instruct (bf16) upcycled into 8 experts, top-2,
random gates, bf16, saved to disk. Each run is a whole process, timed from spawn to exit
(wall) with its peak RSS from ``wait4`` (that process alone). Tools are interleaved (ours,
theirs, ours, ...) for ``--rounds`` rounds (default 5); each row gives min / median / max, the
ratios ours/mergekit of medians and of minimums come from this one run, and a row whose
spread exceeds 30% is flagged. Side-by-side tables at 8 and 32 experts (``--experts``). Before every run the previous output is deleted and the page
cache flushed to disk (``sync``), so no run pays for another's writes.

Also printed: the I/O floor (bytes written + read over the throughput of a plain file copy of
the same size, measured here), each output's max |logit difference| to the dense model, and
the memory model of ``run()``.

The baselines get their own virtual environments, created on first use:
``.venv-bench-mergekit`` (``pip install mergekit``) and ``.venv-tf4`` (transformers 4.57,
where FusionBench's Mixtral code imports). Results go to ``benchmarks/results/``.
This script uses only the standard library; it is not part of the CI test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "benchmarks" / "jobs.py"
RESULTS = REPO / "benchmarks" / "results"
VENV = REPO / ".venv"
VENV_TF4 = REPO / ".venv-tf4"
VENV_MERGEKIT = REPO / ".venv-bench-mergekit"
MERGEKIT_VERSION = "0.1.5"
MERGEKIT = "mergekit-moe 0.1.5"
MERGEKIT_1T = "mergekit-moe 0.1.5, OMP_NUM_THREADS=1"
FUSIONBENCH = "FusionBench MixtralForCausalLMUpscalingAlgorithm (tf 4.57)"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(message: str) -> None:
    print(message, flush=True)


def py(venv: Path) -> str:
    return str(venv / "bin" / "python")


# -- set-up ------------------------------------------------------------------------------


def pip_install(venv: Path, *args: str) -> None:
    subprocess.run(
        [py(venv), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        check=True,
        cwd=REPO,
    )


def setup() -> None:
    """Create what is missing: the project's venvs, mergekit's venv, the SmolLM2 model."""
    if not (VENV / "bin" / "python").exists() or not (VENV_TF4 / "bin" / "python").exists():
        log("== setting up .venv and .venv-tf4 (scripts/setup.sh --tf4 --no-text)")
        subprocess.run(["bash", "scripts/setup.sh", "--tf4", "--no-text"], check=True, cwd=REPO)
    stamp = VENV_MERGEKIT / ".bench-setup"
    if not stamp.is_file() or stamp.read_text().strip() != MERGEKIT_VERSION:
        log(f"== setting up {VENV_MERGEKIT.name} (mergekit {MERGEKIT_VERSION})")
        if not (VENV_MERGEKIT / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV_MERGEKIT)], check=True)
        constraints = ["-c", "constraints.txt"] if (REPO / "constraints.txt").is_file() else []
        pip_install(VENV_MERGEKIT, *constraints, f"mergekit=={MERGEKIT_VERSION}")
        stamp.write_text(MERGEKIT_VERSION + "\n")
    smollm2 = smollm2_dir()
    if not (smollm2 / "model.safetensors").is_file():
        log("== preparing SmolLM2-135M-Instruct")
        subprocess.run(
            [py(VENV), "-m", "fusion_bench_moect.cli.smollm2"], check=True, cwd=REPO, env=ENV
        )


def smollm2_dir() -> Path:
    root = os.environ.get("FUSION_BENCH_MOECT_CACHE")
    cache = Path(root).expanduser() if root else Path.home() / ".cache" / "fusion_bench_moect"
    return cache / "SmolLM2-135M-Instruct"


# -- measuring ---------------------------------------------------------------------------


def measure(
    cmd: list[str],
    out: Path | None,
    cwd: Path = REPO,
    env: dict | None = None,
    sync: bool = False,
) -> dict:
    """Run ``cmd`` as its own process: wall seconds, peak RSS bytes, its JSON line if any.
    With ``sync`` the wall time runs until a ``sync`` after the process returns (its writes
    are on the disk)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env={**ENV, **(env or {})}, stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(proc.pid, 0)
        if sync:
            os.sync()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        text, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    result = {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            result.update(json.loads(line))
            break
    if out is not None:
        result["output_bytes"] = dir_bytes(out)
    return result


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def copy_throughput(size: int, work: Path, rounds: int) -> float:
    """Bytes per second moved (read + written) by a plain copy of a ``size``-byte file."""
    src, dst = work / "io-src.bin", work / "io-dst.bin"
    chunk = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    times = []
    for _ in range(rounds):
        dst.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        shutil.copyfile(src, dst)
        times.append(time.perf_counter() - start)
    src.unlink()
    dst.unlink()
    return 2 * (size >> 20 << 20) / statistics.median(times)


# -- the jobs ----------------------------------------------------------------------------


def mergekit_config(
    base: Path, experts: int, path: Path, sources: dict[str, Path] | None = None
) -> Path:
    """mergekit-moe's config: ``experts`` copies of the base, or the base + ``sources``."""
    lines = [f"base_model: {base}", "gate_mode: random", "dtype: bfloat16", "experts_per_token: 2"]
    models = [base, *sources.values()] if sources else [base] * experts
    lines += ["experts:"] + [f"  - source_model: {m}" for m in models]
    path.write_text("\n".join(lines) + "\n")
    return path


#: Jobs run only at the smallest expert count: FusionBench's own upcycling writes float32
#: (10 GB at 32 experts) and mergekit's single-thread variant only gives a second reference.
SMALL_ONLY = (MERGEKIT_1T, FUSIONBENCH)
IMPORT_FUSIONBENCH = "import CausalLMPool + OrthogonalMoECTMergingAlgorithm only (no work)"
#: The default paths: run() with save_checkpoint returns the model (the written files, mapped).
API_SAVE = "ours: Python API run() (returns the model + saves)"
LEAN = "ours: python -m fusion_bench_moect.cli.upcycle (streaming)"
CLI_SAVE = "ours: fusion_bench CLI (model + save)"


def compare_jobs(
    base: Path,
    work: Path,
    experts: int,
    small: bool = True,
    sources: dict[str, Path] | None = None,
) -> dict[str, tuple[list[str], Path, dict]]:
    """name -> (command, output directory, extra environment). Ours and theirs alternate.

    With ``sources`` (fine-tunes of the base) the job is a merge: the base + the sources as
    experts (ours with MoE-CT lerp, its default), without the FusionBench-only rows."""
    jobs = job_table(base, work, experts, sources)
    if sources:
        drop = (*SMALL_ONLY, CLI_SAVE)
        return {name: job for name, job in jobs.items() if name not in drop}
    if not small:
        return {name: job for name, job in jobs.items() if name not in SMALL_ONLY}
    jobs[IMPORT_FUSIONBENCH] = (
        [
            py(VENV),
            "-c",
            "from fusion_bench.modelpool import CausalLMPool; "
            "from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm",
        ],
        None,
        {},
    )
    return jobs


def job_table(
    base: Path, work: Path, experts: int, sources: dict[str, Path] | None
) -> dict[str, tuple[list[str], Path, dict]]:
    """Every job of ``compare_jobs``, in its order."""
    names = ("lean", "api", "mergekit", "mergekit1", "cli", "stream", "fb")
    out = {name: work / name for name in names}
    mergekit_yml = str(mergekit_config(base, experts, work / "mergekit.yml", sources))
    size = ["--num-experts", str(experts)]
    source_args = [f"--source={name}={path}" for name, path in (sources or {}).items()]
    jobs = {
        LEAN: (
            [py(VENV), "-m", "fusion_bench_moect.cli.upcycle", str(base), str(out["lean"])]
            + (source_args or size)
            + ["--gate-mode", "random", "--dtype", "bfloat16"],
            out["lean"],
            {},
        ),
        MERGEKIT: (
            [str(VENV_MERGEKIT / "bin" / "mergekit-moe"), mergekit_yml, str(out["mergekit"])],
            out["mergekit"],
            {},
        ),
        API_SAVE: (
            [py(VENV), str(JOBS), "ours-api", str(base), str(out["api"]), str(experts)]
            + source_args,
            out["api"],
            {},
        ),
        MERGEKIT_1T: (
            [str(VENV_MERGEKIT / "bin" / "mergekit-moe"), mergekit_yml, str(out["mergekit1"])],
            out["mergekit1"],
            {"OMP_NUM_THREADS": "1"},
        ),
        FUSIONBENCH: (
            [py(VENV_TF4), str(JOBS), "fusionbench", str(base), str(out["fb"]), str(experts)],
            out["fb"],
            {},
        ),
        CLI_SAVE: (fusion_bench_command(base, out["cli"], experts, work / "hydra"), out["cli"], {}),
        "ours: Python API run(), streaming": (
            [py(VENV), str(JOBS), "ours-api", str(base), str(out["stream"]), str(experts)]
            + ["--streaming", *source_args],
            out["stream"],
            {},
        ),
    }
    return jobs


def fusion_bench_command(base: Path, out: Path, experts: int, logs: Path) -> list[str]:
    """The ``fusion_bench`` CLI job: upcycle ``base`` and save to ``out``, no evaluation."""
    return [
        str(VENV / "bin" / "fusion_bench"),
        "method=moe_ct_upcycling",
        f"method.num_experts={experts}",
        "method.gate_mode=random",
        "method.dtype=bfloat16",
        f"method.save_checkpoint={out}",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={base}",
        "taskpool=dummy",
        f"hydra.run.dir={logs}",
        f"path.log_dir={logs}",
    ]


def spread(values: list[float]) -> dict:
    """min / median / max, and whether (max - min) / median exceeds 30%."""
    median = statistics.median(values)
    return {
        "min": min(values),
        "median": median,
        "max": max(values),
        "noisy": (max(values) - min(values)) > 0.3 * median,
    }


def interleaved(
    jobs: dict[str, tuple[list[str], Path | None, dict]],
    rounds: int,
    sync: bool = False,
    command: Any = None,
) -> dict[str, list[dict]]:
    """Every job once per round, in order (ours and theirs alternate); each job's results.

    With ``sync`` each run is timed until ``sync`` returns and its output is deleted right
    after (one output on disk at a time). ``command(name, results so far)`` may give a job's
    command at run time (an empty command in ``jobs``).
    """
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, (cmd, out, env) in jobs.items():
            result = measure(cmd or command(name, runs), out, env=env, sync=sync)
            if sync and out is not None:
                shutil.rmtree(out, ignore_errors=True)
            runs[name].append(result)
            log(
                f"  round {r + 1}: {name:62s} {result['wall_s']:6.2f} s "
                f"{result['peak_rss'] / 1e9:5.2f} GB  (load {os.getloadavg()[0]:.1f})"
            )
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per job: min / median / max of wall and peak RSS, all walls, the output's size."""
    return {
        name: {
            "wall": spread([r["wall_s"] for r in results]),
            "rss": spread([r["peak_rss"] for r in results]),
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "wall_all": [round(r["wall_s"], 2) for r in results],
            "peak_rss": statistics.median(r["peak_rss"] for r in results),
            "baseline_rss": statistics.median(r.get("baseline_rss", 0) for r in results),
            "output_bytes": results[-1].get("output_bytes", 0),
        }
        for name, results in runs.items()
    }


def compare(
    args: argparse.Namespace,
    work: Path,
    experts: int,
    small: bool,
    sources: dict[str, Path] | None = None,
) -> dict:
    base = smollm2_dir()
    jobs = compare_jobs(base, work, experts, small, sources)
    what = f"base + {len(sources)} fine-tunes" if sources else f"{experts} experts"
    log(f"== side by side: SmolLM2-135M bf16 -> {what}, {args.rounds} rounds")
    summary = summarize(interleaved(jobs, args.rounds))
    base_bytes = weights_bytes(base)
    written = summary[MERGEKIT]["output_bytes"]
    throughput = copy_throughput(written, work, 3 if small else 1)
    floor = (written + base_bytes) / throughput
    log("== correctness: max |logit difference| to the dense model (float32 compute)")
    outputs = [job[1] for job in jobs.values() if job[1] is not None]
    check = measure([py(VENV), str(JOBS), "check", str(base)] + [str(o) for o in outputs], None)
    for name, (_, out, _) in jobs.items():
        if out is not None:
            summary[name]["max_logit_diff"] = check.get(str(out))
            shutil.rmtree(out, ignore_errors=True)
    job = f"SmolLM2-135M-Instruct bf16 -> {experts} experts, top-2, random gates, bf16, saved"
    if sources:
        job = (
            f"merge: SmolLM2-135M-Instruct bf16 + {len(sources)} fine-tunes (stand-ins: FFN + 1 % "
            f"noise) -> {len(sources) + 1} experts (base + fine-tunes; ours with MoE-CT lerp, "
            "its default), top-2, random gates, bf16, saved; the logit check is against the "
            "dense base, which a merge does not reproduce"
        )
    return {
        "experts": experts,
        "merge": bool(sources),
        "job": job,
        "rounds": args.rounds,
        "base_bytes": base_bytes,
        "copy_throughput": throughput,
        "io_floor_s": floor,
        "tools": summary,
    }


def merge_compare(args: argparse.Namespace, work: Path) -> dict:
    """The merge table: the base + ``args.merge`` fine-tune stand-ins (made once in ``work``)."""
    base = smollm2_dir()
    folder = work / "finetunes"
    measure([py(VENV), str(JOBS), "make-finetunes", str(base), str(folder), str(args.merge)], None)
    sources = {f"ft{i}": folder / f"ft{i}" for i in range(1, args.merge + 1)}
    return compare(args, work, args.merge + 1, small=False, sources=sources)


def scaling(args: argparse.Namespace, work: Path) -> list[dict]:
    base = smollm2_dir()
    rows = []
    log("== scaling (ours): streaming (lean CLI) and in memory (Python API run() + save)")
    qwen3 = work / "qwen3-base"
    measure([py(VENV), str(JOBS), "make-qwen3", str(qwen3)], None)
    cases = [(base, "SmolLM2-135M", e, 1, 2) for e in args.scaling_experts]
    cases.append((qwen3, "Qwen3 random (H 512, 8 layers, I 2048)", 128, 8, 8))
    for model, label, experts, granularity, topk in cases:
        out = work / "scale"
        flags = ["--num-experts", str(experts), "--granularity", str(granularity)]
        flags += ["--experts-per-token", str(topk), "--dtype", "bfloat16", "-q"]
        gate = "random" if granularity == 1 else "orthogonal"
        lean = [py(VENV), "-m", "fusion_bench_moect.cli.upcycle", str(model), str(out)]
        lean += flags + ["--gate-mode", gate]
        api = [py(VENV), str(JOBS), "ours-api", str(model), str(out), str(experts)]
        api += ["--granularity", str(granularity), "--topk", str(topk), "--gate-mode", gate]
        row = {
            "model": label,
            "experts": experts,
            "granularity": granularity,
            "top_k": topk,
            "base_bytes": weights_bytes(model),
            "commands": {
                "streaming": portable(lean, model, out),
                "in_memory": portable(api, model, out),
            },
        }
        for mode, cmd in (("streaming", lean), ("in_memory", api)):
            results = [measure(cmd, out) for _ in range(args.scaling_rounds)]
            row[mode] = {
                "wall_s": statistics.median(r["wall_s"] for r in results),
                "peak_rss": statistics.median(r["peak_rss"] for r in results),
                "baseline_rss": statistics.median(r.get("baseline_rss", 0) for r in results),
            }
            row["output_bytes"] = results[-1]["output_bytes"]
            if mode == "streaming" and experts in (8, 128):
                check = measure([py(VENV), str(JOBS), "check", str(model), str(out)], None)
                row["max_logit_diff"] = check.get(str(out))
            log(
                f"  {label} E={experts:3d} {mode:9s} {row[mode]['wall_s']:6.2f} s "
                f"{row[mode]['peak_rss'] / 1e9:5.2f} GB peak, {row['output_bytes'] / 1e9:5.2f} GB"
            )
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
    return rows


# -- the 1B-shape case ---------------------------------------------------------------------

DD_BUFFERED = "dd conv=fdatasync, the same bytes (through the page cache)"
DD_DIRECT = "dd oflag=direct, the same bytes (the disk alone)"
API_TOUCH = "ours: Python API run(), then every weight read once"
SMALL_LEAN = "ours: lean CLI, SmolLM2-135M, same experts"
SMALL_API = "ours: Python API run(), SmolLM2-135M, same experts"
#: dd's flags per dd row.
DD_FLAGS = {DD_BUFFERED: ["conv=fdatasync"], DD_DIRECT: ["oflag=direct", "conv=fdatasync"]}


def large_jobs(base: Path, work: Path, experts: int) -> dict[str, tuple[list[str], Path, dict]]:
    """The 1B-shape rows: every writer of ``compare_jobs`` on ``base``, the import-only row,
    the Python API followed by a read of every weight of the model it returns, our two default
    paths on SmolLM2 at the same expert count (time per GB at both scales), and dd writing the
    same bytes (its command is made once the lean CLI has written)."""
    jobs = compare_jobs(base, work, experts, small=True)
    jobs.pop(MERGEKIT_1T)
    jobs.pop(FUSIONBENCH)
    touch = [py(VENV), str(JOBS), "ours-api", str(base), str(work / "touch"), str(experts)]
    jobs[API_TOUCH] = (touch + ["--touch"], work / "touch", {})
    small = work / "smollm2"
    small.mkdir(exist_ok=True)
    smollm2 = compare_jobs(smollm2_dir(), small, experts, small=False)
    jobs[SMALL_LEAN] = smollm2[LEAN]
    jobs[SMALL_API] = smollm2[API_SAVE]
    for name in DD_FLAGS:
        jobs[name] = ([], work / name.split(",")[0].replace(" ", "-"), {})
    return jobs


def dd_command(out: Path, nbytes: int, flags: list[str]) -> list[str]:
    """``dd`` writing ``nbytes`` zeros to ``out/dd.bin`` (``out`` made first)."""
    dd = ["dd", "if=/dev/zero", f"of={out / 'dd.bin'}", "bs=16M", f"count={nbytes}"]
    dd += ["iflag=count_bytes", "status=none", *flags]
    return ["sh", "-c", f"mkdir -p {shlex.quote(str(out))} && exec {shlex.join(dd)}"]


def large(args: argparse.Namespace, work: Path, experts: int) -> dict:
    """``args.rounds`` interleaved rounds of ``large_jobs``, sync included, one output on
    disk at a time; dd writes as many bytes as the lean CLI did."""
    base = work / "llama1b"
    tokenizer = ["--tokenizer", str(smollm2_dir())]
    measure([py(VENV), str(JOBS), "make-llama1b", str(base), *tokenizer], None)
    jobs = large_jobs(base, work, experts)

    def dd(name: str, runs: dict[str, list[dict]]) -> list[str]:
        return dd_command(jobs[name][1], runs[LEAN][-1]["output_bytes"], DD_FLAGS[name])

    log(f"== 1B shape: {LARGE_JOB} -> {experts} experts, {args.rounds} rounds, sync included")
    try:
        summary = summarize(interleaved(jobs, args.rounds, sync=True, command=dd))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"experts": experts, "rounds": args.rounds, "tools": summary}


#: The synthetic base (benchmarks/jobs.py make-llama1b).
LARGE_JOB = (
    "Llama-3.2-1B shape (hidden 2048, FFN 8192, 16 layers, vocab 49152, tied embeddings), "
    "random bf16 weights, 2.15 GB"
)
#: (label, row, reference row, target): the ratios of issue 21, medians.
LARGE_TARGETS = (
    ("default path (Python API) / lean CLI, wall", API_SAVE, LEAN, 1.15),
    ("default path (fusion_bench CLI) / lean CLI, wall", CLI_SAVE, LEAN, 1.15),
    ("default path (Python API) / lean CLI, peak RSS", API_SAVE, LEAN, 1.3),
    ("default path (Python API) / mergekit-moe, wall", API_SAVE, MERGEKIT, 0.55),
    ("default path (fusion_bench CLI) / mergekit-moe, wall", CLI_SAVE, MERGEKIT, 0.55),
    ("lean CLI / dd conv=fdatasync, wall", LEAN, DD_BUFFERED, 1.2),
    ("lean CLI / dd oflag=direct, wall", LEAN, DD_DIRECT, None),
)


def large_table(result: dict) -> str:
    tools = result["tools"]
    lines = [
        f"Job: {LARGE_JOB} -> {result['experts']} experts, top-2, random gates, bf16, saved; "
        f"{result['rounds']} interleaved rounds; every run timed from spawn until `sync` "
        "returns after it; min / median / max per row; rows whose spread exceeds 30% of the "
        "median are flagged.",
        "",
        "| row | wall s min / median / max | GB written / s (median) | peak RSS GB min / median "
        "/ max | output GB | spread > 30% |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in tools.items():
        w, m, out = t["wall"], t["rss"], t["output_bytes"] / 1e9
        cells = [
            name,
            f"{w['min']:.2f} / {w['median']:.2f} / {w['max']:.2f}",
            f"{out / w['median']:.2f}" if out else "",
            f"{m['min'] / 1e9:.2f} / {m['median'] / 1e9:.2f} / {m['max'] / 1e9:.2f}",
            f"{out:.2f}" if out else "",
            "**yes**" if w["noisy"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (medians) | value | target |", "| --- | --- | --- |"]
    for label, row, ref, target in LARGE_TARGETS:
        key = "rss" if "RSS" in label else "wall"
        value = tools[row][key]["median"] / tools[ref][key]["median"]
        verdict = (
            "" if target is None else f"<= {target}x: {'met' if value <= target else '**not met**'}"
        )
        lines.append(f"| {label} | {value:.2f}x | {verdict} |")
    bare = tools[API_SAVE]["wall"]["median"] - tools[IMPORT_FUSIONBENCH]["wall"]["median"]
    lines += [
        "",
        f"The Python API without FusionBench's import (the import-only row's median subtracted):"
        f" {bare:.2f} s, {bare / tools[LEAN]['wall']['median']:.2f}x the lean CLI.",
    ]
    per_gb = [
        f"{name}: {t['wall']['median'] / (t['output_bytes'] / 1e9):.2f} s/GB"
        for name, t in tools.items()
        if name in (SMALL_LEAN, SMALL_API, LEAN, API_SAVE)
    ]
    lines += ["", "Seconds per GB written (median wall / output): " + "; ".join(per_gb) + "."]
    return "\n".join(lines)


# -- reporting ---------------------------------------------------------------------------


def compare_table(result: dict) -> str:
    tools = result["tools"]
    ref = tools[MERGEKIT]
    lines = [
        f"Job: {result['job']}; {result['rounds']} interleaved rounds; min / median / max per "
        "row; ratios to mergekit-moe from this run (median / median, min / min); rows whose "
        "spread (max - min) exceeds 30% of the median are flagged.",
        "",
        "| tool | wall s min / median / max | peak RSS GB min / median / max | output GB "
        "| max logit diff | wall / mergekit (median, min) | RSS / mergekit (median) | spread > 30% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in tools.items():
        ours = name.startswith("ours")
        diff = t.get("max_logit_diff")
        diff_text = f"{diff:.2e}" if isinstance(diff, float) else str(diff or "")
        w, m = t["wall"], t["rss"]
        cells = [
            name,
            f"{w['min']:.2f} / {w['median']:.2f} / {w['max']:.2f}",
            f"{m['min'] / 1e9:.2f} / {m['median'] / 1e9:.2f} / {m['max'] / 1e9:.2f}",
            f"{t['output_bytes'] / 1e9:.2f}" if t["output_bytes"] else "",
            diff_text,
        ]
        if ours:
            cells += [
                f"**{w['median'] / ref['wall']['median']:.2f}x**, "
                f"{w['min'] / ref['wall']['min']:.2f}x",
                f"**{m['median'] / ref['rss']['median']:.2f}x**",
            ]
        else:
            cells += ["", ""]
        cells.append("**yes**" if w["noisy"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"I/O floor: {tools[MERGEKIT]['output_bytes'] / 1e9:.2f} GB written + "
        f"{result['base_bytes'] / 1e9:.2f} GB read at {result['copy_throughput'] / 1e9:.2f} GB/s "
        f"(plain copy of the same size, read + write) = {result['io_floor_s']:.2f} s.",
    ]
    if IMPORT_FUSIONBENCH in tools:
        lines.append(
            f"FusionBench's import alone (a process that only imports fusion_bench_moect and "
            f"CausalLMPool): {tools[IMPORT_FUSIONBENCH]['wall']['median']:.2f} s median; every "
            "Python-API and fusion_bench CLI row carries it."
        )
    api = tools[API_SAVE]
    above = api["peak_rss"] - api["baseline_rss"]
    lines.append(
        f"Memory of run() with save_checkpoint (streamed, then the files mapped as the returned "
        f"model): peak {above / 1e9:.2f} GB above the interpreter's baseline "
        f"({api['baseline_rss'] / 1e9:.2f} GB) for {api['output_bytes'] / 1e9:.2f} GB written."
    )
    return "\n".join(lines)


def portable(cmd: list[str], model: Path, out: Path) -> str:
    """A command as a reader can type it from the repository root."""
    names = {str(model): "$BASE", str(smollm2_dir()): "$SMOLLM2", str(out): "OUT"}
    words = []
    for word in cmd:
        word = names.get(word, word)
        if word.startswith(str(REPO) + "/"):
            word = word[len(str(REPO)) + 1 :]
        words.append(word)
    return " ".join(words).replace(".venv/bin/python", "python")


def scaling_table(rows: list[dict]) -> str:
    modes = ("streaming", "in_memory")
    lines = [
        "| model | E (G, top-k) | output GB | streaming s | streaming peak RSS GB "
        "| in-memory s | in-memory peak RSS GB | s per output GB (stream / mem) "
        "| marginal s per GB vs previous row (stream / mem) | max logit diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    previous = None
    for row in rows:
        out_gb = row["output_bytes"] / 1e9
        diff = row.get("max_logit_diff")
        whole = " / ".join(f"{row[m]['wall_s'] / out_gb:.2f}" for m in modes)
        marginal = ""
        if previous is not None and previous["model"] == row["model"]:
            step = out_gb - previous["output_bytes"] / 1e9
            marginal = " / ".join(
                f"{(row[m]['wall_s'] - previous[m]['wall_s']) / step:.2f}" for m in modes
            )
        s, m = row["streaming"], row["in_memory"]
        lines.append(
            f"| {row['model']} | {row['experts']} ({row['granularity']}, {row['top_k']}) "
            f"| {out_gb:.2f} | {s['wall_s']:.2f} | {s['peak_rss'] / 1e9:.2f} "
            f"| {m['wall_s']:.2f} | {m['peak_rss'] / 1e9:.2f} | {whole} | {marginal} "
            f"| {f'{diff:.1e}' if isinstance(diff, float) else (diff or '')} |"
        )
        previous = row
    lines += [
        "",
        "Commands, from the repository root (`SMOLLM2=~/.cache/fusion_bench_moect/"
        "SmolLM2-135M-Instruct`; the Qwen3 base: `python benchmarks/jobs.py make-qwen3 $BASE`; "
        "OUT a new directory):",
    ]
    for row in rows:
        for mode in modes:
            label = mode.replace("_", " ")
            lines.append(f"- E={row['experts']} {label}: `{row['commands'][mode]}`")
    return "\n".join(lines)


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("compare", "scaling", "large"), default=None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (compare)")
    parser.add_argument(
        "--experts",
        type=numbers,
        default=[8, 32],
        help="expert counts of the side-by-side tables (comma-separated)",
    )
    parser.add_argument("--scaling-experts", type=numbers, default=[4, 8, 16, 32, 64])
    parser.add_argument("--scaling-rounds", type=int, default=1)
    parser.add_argument(
        "--merge", type=int, default=3, help="fine-tunes in the merge table (0 = no merge table)"
    )
    parser.add_argument(
        "--large-experts",
        type=numbers,
        default=[8],
        help="expert counts of the 1B-shape tables (--only large; one output on disk at a time: "
        "13.4 GB at 8 experts, 26 GB at 16, 52 GB at 32, plus the 2.15 GB base)",
    )
    parser.add_argument("--skip-setup", action="store_true")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    start = time.perf_counter()
    if not args.skip_setup:
        setup()
    work = Path(args.work or tempfile.mkdtemp(prefix="moect-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {"date": stamp, "machine": machine()}
    tables = []
    try:
        if args.only in (None, "compare"):
            report["compare"] = [
                compare(args, work, experts, small=experts <= 8) for experts in args.experts
            ]
            if args.merge:
                report["compare"].append(merge_compare(args, work))
            tables += [compare_table(result) for result in report["compare"]]
        if args.only in (None, "scaling"):
            report["scaling"] = scaling(args, work)
            tables.append(scaling_table(report["scaling"]))
        if args.only == "large":
            report["large"] = [large(args, work, experts) for experts in args.large_experts]
            tables += [large_table(result) for result in report["large"]]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for table in tables:
        log("\n" + table + "\n")
    report["total_s"] = time.perf_counter() - start
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"bench-{stamp}.md").write_text("\n\n".join(tables) + "\n")
    log(f"== done in {report['total_s']:.0f} s; results in {path} and {path.with_suffix('.md')}")
    return 0


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        info["load_avg"] = os.getloadavg()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["memory"] = mem.split(":", 1)[1].strip()
    except OSError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
