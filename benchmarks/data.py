#!/usr/bin/env python3
"""Training data at scale: token-store build speed against today's in-memory path, the second
launch to the first optimiser step, data memory per process, loader against training speed.

    flock /tmp/moect-heavy.lock .venv/bin/python benchmarks/data.py --root /tmp/data/bench

The corpus (``--gb`` GB, default 1) is assembled offline from what a Debian machine has: every
UTF-8 file under /usr/share/doc (gzip-compressed ones decompressed: changelogs, copyright files,
READMEs) and /usr/share/man (troff sources), about 360 MB of distinct text, written into 10 MB
files ``part-NNN.txt`` in a shuffled document order, a new order (seeded) for every repetition
until the size is reached. The 0.1 GB corpus is its first 10 files.

Rows (each a fresh process, SmolLM2-135M's tokenizer):

* ``build``: text -> token store (``data.store.ensure_store``) of the first ``--slice-mb`` MB,
  with the Rust encoder's thread pool at 1 and at 2 threads (``RAYON_NUM_THREADS``),
  interleaved for ``--rounds`` rounds with ``old``: today's path before the store
  (``training.data.pack_documents``, ``tokenizer()`` on 1 MiB chunks, in memory). MB/s of text.
* ``build 0.1 GB`` / ``build 1 GB``: the two whole stores, once (2 threads).
* ``launch``: ``moe_ct_training`` on the SmolLM2 4-expert MoE (benchmarks/training.py's) with
  the stores built: a weighted mixture of the corpus (0.8) and English replay (the Debian
  Reference, 0.2); seconds from starting the process to the end of the first optimiser step,
  and to the start of the training loop (everything but the step's own compute), and the
  loop's training tokens/s (3 steps of 2 x 256 tokens, 1 process).
* ``rss``: one process opens the stores of the mixture and reads 500 micro-batches through
  the DataLoader: RSS after, less RSS before (the tokenizer loaded), anonymous and file-backed.
* ``loader``: tokens/s of that DataLoader (2 x 256-token windows per micro-batch).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART = 10_000_000
TOKENIZER = Path.home() / ".cache" / "fusion_bench_moect" / "SmolLM2-135M-Instruct"


def _texts() -> list[str]:
    texts = []
    for top in ("/usr/share/doc", "/usr/share/man"):
        for root, _, files in sorted(os.walk(top)):
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue
                try:
                    raw = (
                        gzip.open(path).read() if name.endswith(".gz") else open(path, "rb").read()
                    )  # noqa: SIM115
                    text = raw.decode("utf-8")
                except (OSError, UnicodeDecodeError, EOFError):
                    continue
                if text.strip():
                    texts.append(text)
    return texts


def corpus(root: Path, gb: float) -> Path:
    """``root/corpus/part-NNN.txt``: ``gb`` GB of Debian documentation (see the docstring)."""
    folder = root / "corpus"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    texts, written, part, buffer = _texts(), 0, 0, []
    rng = random.Random(0)
    while written < gb * 1e9:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for i in order:
            buffer.append(texts[i])
            if sum(len(t) for t in buffer) >= PART or written >= gb * 1e9:
                data = "\n\n".join(buffer).encode()
                (folder / f"part-{part:03d}.txt").write_bytes(data)
                written, part, buffer = written + len(data), part + 1, []
                if written >= gb * 1e9:
                    break
    (folder / "done").write_text(json.dumps({"bytes": written, "distinct_texts": len(texts)}))
    return folder


def _rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def _sources(glob: str) -> dict:
    return {"corpus": {"path": glob, "weight": 0.8},
            "en_replay": {"debian_reference": "en", "weight": 0.2}}  # fmt: skip


def worker(args) -> dict:
    """One measurement in this (fresh) process; the row's numbers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    size = sum(p.stat().st_size for p in Path(args.source).parent.glob(Path(args.source).name))
    if args.worker == "old":
        from fusion_bench_moect.training.data import iter_documents, pack_documents

        started = time.perf_counter()
        windows = pack_documents(tokenizer, iter_documents(args.source), 256)
        seconds = time.perf_counter() - started
        return {"mb_s": size / 1e6 / seconds, "seconds": seconds, "tokens": windows.numel()}
    if args.worker == "build":
        from fusion_bench_moect.data.store import ensure_store

        started = time.perf_counter()
        store = ensure_store(tokenizer, args.source, "corpus", args.cache)
        seconds = time.perf_counter() - started
        return {"mb_s": size / 1e6 / seconds, "seconds": seconds, "tokens": len(store.tokens)}
    if args.worker == "launch":
        return launch(args, tokenizer)
    return loader(args, tokenizer)


def loader(args, tokenizer) -> dict:
    """RSS of the data and the loader's tokens/s (the ``rss`` and ``loader`` rows)."""
    from torch.utils.data import DataLoader

    from fusion_bench_moect.training.data import open_training_data
    from fusion_bench_moect.training.sampler import MixtureBatchSampler

    before = _rss()
    data = open_training_data(tokenizer, _sources(args.source), 256, args.cache)
    sampler = MixtureBatchSampler(data.mixture(2, 0), data.offsets, 2)
    started, tokens = time.perf_counter(), 0
    for index, batch in enumerate(DataLoader(data, batch_sampler=sampler)):
        tokens += batch.numel()
        if index == 499:
            break
    seconds = time.perf_counter() - started
    after = _rss()
    stores = sorted(str(s.path) for s in data.stores.values())
    return {"tokens_s": tokens / seconds, "stores": stores,
            **{f"{k}_mib": after[k] - before[k] for k in after}}  # fmt: skip


def launch(args, tokenizer) -> dict:
    """Train 3 steps; seconds from process start to the first optimiser step, tokens/s."""
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect.training import MoECTTrainingAlgorithm
    from fusion_bench_moect.training.loop import TrainingLoop

    marks: dict[str, float] = {}
    step, train = TrainingLoop._optimizer_step, TrainingLoop.train

    def first_step(self, number):
        step(self, number)
        marks.setdefault("first", time.time())

    def timed(self, position):
        marks["start"] = time.time()
        marks["loop"] = time.perf_counter()
        train(self, position)
        marks["loop"] = time.perf_counter() - marks["loop"]

    TrainingLoop._optimizer_step, TrainingLoop.train = first_step, timed
    from fusion_bench_moect.training import algorithm

    shared = algorithm.shared_training_data

    def timed_data(*a, **k):
        started = time.perf_counter()
        data = shared(*a, **k)
        marks["data"] = time.perf_counter() - started
        return data

    algorithm.shared_training_data = timed_data
    marks["imported"] = time.time()
    algo = MoECTTrainingAlgorithm(
        train_sources=_sources(args.source), stage="experts", max_steps=3, batch_size=2,
        seq_len=256, accelerator="cpu", data_cache_dir=args.cache, log_every=100,
    )  # fmt: skip
    algo.run(CausalLMPool(models={"_pretrained_": args.moe}, tokenizer=str(TOKENIZER)))
    return {"first_step_s": marks["first"] - args.spawned,
        "imports_s": marks["imported"] - args.spawned, "data_s": marks["data"], "loop_start_s": marks["start"] - args.spawned,
            "train_tokens_s": 3 * 512 / marks["loop"],
            "plan": algo.data_plan}  # fmt: skip


def run(kind: str, source: str, cache: Path, threads: int = 2, **extra) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--source", source, "--cache",
               str(cache), *[f"--{k}={v}" for k, v in extra.items()]]  # fmt: skip
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    spawned = time.time()
    out = subprocess.run(
        [*command, f"--spawned={spawned}"], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/data/bench"))
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--slice-mb", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launch-rounds", type=int, default=3)
    parser.add_argument("--only-launch", action="store_true", help="the launch rows alone")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the stores")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--moe", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = measure(args)
    print(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(args.root / "corpus", ignore_errors=True)
        shutil.rmtree(args.root / "stores", ignore_errors=True)


def measure(args) -> dict:
    """Every row (see the module docstring), interleaved where there are rounds."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from training import smollm2_moe  # the training benchmark's 4-expert SmolLM2 MoE

    load = [os.getloadavg()[0]]
    folder = corpus(args.root, args.gb)
    parts = PART // 1_000_000
    slice_glob = str(folder / f"part-00[0-{args.slice_mb // parts - 1}].txt")
    small, big = str(folder / "part-00?.txt"), str(folder / "part-*.txt")
    rows: dict[str, list] = {"old": [], "store, 1 thread": [], "store, 2 threads": []}
    for _ in range(0 if args.only_launch else args.rounds):
        for row, threads in (("old", 2), ("store, 1 thread", 1), ("store, 2 threads", 2)):
            cache = args.root / "scratch"
            shutil.rmtree(cache, ignore_errors=True)
            kind = "old" if row == "old" else "build"
            rows[row].append(run(kind, slice_glob, cache, threads)["mb_s"])
            print(row, rows[row][-1], flush=True)
    stores = args.root / "stores"
    sizes = (("0.1", small), (str(args.gb), big))
    whole = {} if args.only_launch else {size: run("build", glob, stores) for size, glob in sizes}
    print("whole stores", whole, flush=True)
    moe = smollm2_moe(args.root / "smollm2_moe4", architecture="mixtral", granularity=2)
    run("loader", small, stores)  # builds the replay store, warms the page cache: not counted
    launches: dict[str, list] = {"0.1": [], str(args.gb): []}
    memory: dict[str, list] = {"0.1": [], str(args.gb): []}
    for _ in range(args.launch_rounds):
        for size, glob in (("0.1", small), (str(args.gb), big)):
            launches[size].append(run("launch", glob, stores, moe=moe))
            memory[size].append(run("loader", glob, stores))
            print(size, launches[size][-1]["first_step_s"], memory[size][-1], flush=True)
    load.append(os.getloadavg()[0])
    return {"load_average_start_end": load, "slice_mb": args.slice_mb, "rows": {k: spread(v) for k, v in rows.items() if v},
            "raw": rows, "whole": whole, "launches": launches, "memory": memory,
            "corpus": json.loads((folder / "done").read_text())}  # fmt: skip


if __name__ == "__main__":
    main()
