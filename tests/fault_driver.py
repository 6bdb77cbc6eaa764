"""Fault injection: SIGKILL a checkpoint build at chosen points, then check what is on disk.

    python fault_driver.py WORKDIR [--trials N] [--paths lean,algorithm,in_memory]

One process imports everything once; each build runs in a forked child (a real process with
its own locks and temporaries), which a hook kills with SIGKILL just before its K-th file
operation on the target: opening a file to write, creating a directory, a rename, removing a
tree, a chmod (Python's audit events, so no hook in the package itself), or writing the K-th
tensor (looking up ``renameat2`` for an atomic swap counts as a rename). A first, unhurt build of each path and scenario lists its operations; the kill points
are then chosen from that list, the same on every run: every rename, mkdir and tree removal,
and evenly spaced ones among the rest, N in all.

Scenarios: ``fresh`` (the target does not exist) and ``overwrite`` (it holds an older complete
checkpoint, replaced with ``overwrite``). After each kill the target must be absent, the old
checkpoint or the new one (byte for byte), never partial; then a run into the same place with
``overwrite`` must succeed, give the new checkpoint and leave no temporary. Prints a JSON
summary (counts per path and scenario).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

STRUCTURAL = ("os.mkdir", "os.rename", "shutil.rmtree")
AUDITED = (*STRUCTURAL, "open", "os.chmod")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def make_models(root: Path) -> dict[str, str]:
    """A tiny Llama base with a tokenizer, and two fine-tunes of it."""
    from helpers import make_tiny_model, perturbed, train_tokenizer

    dense = make_tiny_model("llama")
    paths = {"_pretrained_": root / "base", "de": root / "de", "fr": root / "fr"}
    dense.save_pretrained(paths["_pretrained_"])
    perturbed(dense, 1).save_pretrained(paths["de"])
    perturbed(dense, 2).save_pretrained(paths["fr"])
    train_tokenizer(paths["_pretrained_"])
    return {name: str(path) for name, path in paths.items()}


def builders(models: dict[str, str]) -> dict[str, Callable[[Path, int], None]]:
    """The three writers, each building the same merge into ``target`` with ``seed``."""
    from fusion_bench.modelpool import CausalLMPool

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
    from fusion_bench_moect.cli.upcycle import main as lean_main
    from fusion_bench_moect.io.checkpoint import save_checkpoint

    def pool() -> CausalLMPool:
        return CausalLMPool(models=models, tokenizer=models["_pretrained_"])

    def lean(target: Path, seed: int) -> None:
        sources = [f"--source={n}={p}" for n, p in models.items() if n != "_pretrained_"]
        argv = [models["_pretrained_"], str(target), *sources, f"--seed={seed}", "--overwrite"]
        if lean_main([*argv, "-q"]) != 0:
            raise SystemExit(3)

    def algorithm(target: Path, seed: int) -> None:
        OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(target), overwrite=True, seed=seed).run(
            pool()
        )

    def in_memory(target: Path, seed: int) -> None:  # the writer of trained models
        p = pool()
        model = OrthogonalMoECTMergingAlgorithm(seed=seed).run(p)
        save_checkpoint(model, target, p.load_tokenizer(), overwrite=True)

    return {"lean": lean, "algorithm": algorithm, "in_memory": in_memory}


class Hook:
    """Counts the file operations on ``target`` (and its temporaries); kills at ``kill_at``."""

    def __init__(self, target: Path, kill_at: int | None) -> None:
        self.target, self.kill_at = target, kill_at
        self.events: list[str] = []

    def concerns(self, path: Any) -> bool:
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str) or not os.path.isabs(path):
            return False
        parent, name = str(self.target.parent), self.target.name
        relative = os.path.relpath(path, parent)
        top = relative.split(os.sep)[0]
        return not relative.startswith("..") and (top == name or top.startswith(f".{name}."))

    def record(self, event: str) -> None:
        if self.kill_at is not None and len(self.events) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.events.append(event)

    def audit(self, event: str, args: tuple) -> None:
        if event == "ctypes.dlsym" and args[1:2] == ("renameat2",):
            self.record("os.rename (atomic swap with the old checkpoint)")
            return
        if event not in AUDITED or not args or not self.concerns(args[0]):
            return
        if event == "open" and not (args[2] if len(args) > 2 else 0) & _WRITE_FLAGS:
            if args[1] is None or not set(str(args[1])) & set("wax+"):
                return
        self.record(f"{event} {os.path.relpath(os.fspath(args[0]), self.target.parent)}")

    def install(self) -> None:
        from fusion_bench_moect.io.streaming import ShardedSafetensorsWriter

        write = ShardedSafetensorsWriter.write

        def counted(writer: Any, name: str, tensor: Any) -> None:
            self.record(f"tensor {name}")
            write(writer, name, tensor)

        ShardedSafetensorsWriter.write = counted
        sys.addaudithook(self.audit)


def in_child(
    build: Callable[[Path, int], None],
    target: Path,
    seed: int,
    kill_at: int | None,
    events_file: Path | None = None,
) -> int | str:
    """Run ``build`` in a forked child; its exit status, or ``"killed"``."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            hook = Hook(target, kill_at)
            hook.install()
            build(target, seed)
            if events_file is not None:
                events_file.write_text(json.dumps(hook.events))
        except BaseException as err:  # reported through the exit status
            print(f"child failed: {err!r}", file=sys.stderr)
            code = 4
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return os.waitstatus_to_exitcode(status)


def digest(directory: Path) -> dict[str, str] | None:
    """Every file's SHA-256, by name; None when ``directory`` does not exist."""
    if not directory.is_dir():
        return None
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def choose_points(events: list[str], trials: int) -> list[int]:
    """The first of each distinct rename, mkdir and tree removal, then evenly spaced other
    operations: ``trials`` indices in all (more when there are more structural ones)."""
    seen: set[str] = set()
    structural = []
    for i, event in enumerate(events):
        if event.split()[0] in STRUCTURAL and event not in seen:
            seen.add(event)
            structural.append(i)
    others = [i for i, e in enumerate(events) if e.split()[0] not in STRUCTURAL]
    want = min(max(trials - len(structural), 0), len(others))
    step = (len(others) - 1) / max(want - 1, 1)
    return sorted({*structural, *(others[round(k * step)] for k in range(want))})


def generic(event: str) -> str:
    """An operation without its process id and random suffix."""
    return re.sub(r"\.(tmp|old)-\d+-[0-9a-f]+", r".\1-PID-XXXX", event)


def reset(target: Path, content: Path | None = None) -> None:
    """Remove ``target`` and its temporaries; then copy ``content`` there, if given."""
    for entry in [target, *target.parent.glob(f".{target.name}.*")]:
        shutil.rmtree(entry, ignore_errors=True)
    if content is not None:
        shutil.copytree(content, target)


def references(build: Callable[[Path, int], None], target: Path) -> dict[str, Path]:
    """The old (seed 7) and new (seed 1) checkpoints, built at ``target`` (the record in
    ``config.json`` names it) and kept beside it."""
    refs = {}
    for label, seed in (("old", 7), ("new", 1)):
        reset(target)
        assert in_child(build, target, seed, None) == 0, f"the {label} reference build failed"
        refs[label] = target.with_name(f"ref-{label}")
        os.replace(target, refs[label])
    return refs


def run_scenario(build, target: Path, scenario: str, trials: int, refs: dict) -> dict[str, Any]:
    """Kill ``build`` at each chosen point of ``scenario``; count what was left."""
    start = refs["old"] if scenario == "overwrite" else None
    expected = {"new": digest(refs["new"]), "old": digest(refs["old"])}
    reset(target, start)
    events_file = target.with_name(f"{scenario}-events.json")
    assert in_child(build, target, 1, None, events_file) == 0, "the unhurt build failed"
    events = json.loads(events_file.read_text())
    counts = dict.fromkeys(("absent", "old", "new", "partial", "not_killed"), 0)
    counts |= dict.fromkeys(("temporaries_after_kill", "rerun_ok", "temporaries_after_rerun"), 0)
    points = choose_points(events, trials)
    for point in points:
        reset(target, start)
        counts["not_killed"] += in_child(build, target, 1, point) != "killed"
        state = digest(target)
        kind = next((k for k, v in expected.items() if v == state), "partial")
        counts["absent" if state is None else kind] += 1
        counts["temporaries_after_kill"] += bool(leftovers(target))
        rerun = in_child(build, target, 1, None)
        counts["rerun_ok"] += rerun == 0 and digest(target) == expected["new"]
        counts["temporaries_after_rerun"] += bool(leftovers(target))
    return {"operations": len(events), "points": [generic(events[p]) for p in points], **counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--paths", default="lean,algorithm,in_memory")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    models = make_models(args.work / "models")
    summary = {}
    for name in args.paths.split(","):
        build = builders(models)[name]
        target = args.work / name / "moe"
        target.parent.mkdir(parents=True)
        refs = references(build, target)
        summary[name] = {
            s: run_scenario(build, target, s, args.trials, refs) for s in ("fresh", "overwrite")
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
