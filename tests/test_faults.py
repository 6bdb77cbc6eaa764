"""Faults and leftovers (docs/reliability.md): builds killed with SIGKILL, temporaries of dead
and live processes, read-only targets, the umask, an output that would replace an input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import perturbed, pool, unavailable

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.io.checkpoint import save_checkpoint

TESTS = Path(__file__).resolve().parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
}
#: As root, permissions are only checked without these capabilities.
DROP_ROOT_POWERS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def lean(*args: str, prefix: list[str] | None = None, umask: int | None = None):
    """``moect-upcycle ARGS`` in a fresh process (stderr holds its log)."""
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "fusion_bench_moect.cli.upcycle", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        preexec_fn=None if umask is None else lambda: os.umask(umask),
    )


def temporaries(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*"))


def test_sigkill_at_chosen_points_leaves_the_target_absent_or_complete(tmp_path):
    """tests/fault_driver.py kills the lean CLI, the algorithm and the in-memory (trained
    model) writer at 6 points each, into a new target and over an old checkpoint."""
    out = subprocess.run(
        [sys.executable, str(TESTS / "fault_driver.py"), str(tmp_path), "--trials", "6"],
        capture_output=True,
        text=True,
        timeout=900,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    for path, scenarios in summary.items():
        for scenario, counts in scenarios.items():
            trials = len(counts["points"])
            assert trials >= 6, (path, scenario, counts)
            assert counts["not_killed"] == 0 and counts["partial"] == 0, (path, scenario, counts)
            if scenario == "fresh":  # killed before the final rename: nothing there yet
                assert counts["absent"] == trials - counts["new"], (path, counts)
            assert counts["rerun_ok"] == trials, (path, scenario, counts)
            assert counts["temporaries_after_rerun"] == 0, (path, scenario, counts)
            assert counts["temporaries_after_kill"] > 0, (path, scenario, counts)


HOLDER = """
import sys, time
from fusion_bench_moect.io.checkpoint import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_live_build_s_temporary_is_kept_and_a_killed_one_s_removed(tmp_path, base_dir):
    """By the next build into the same folder, whatever its name: a killed build into
    another name used to leave its temporary (785 MB for SmolLM2) forever."""
    target = tmp_path / "moe"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.parent == tmp_path and live.name.startswith(f".moe.tmp-{holder.pid}-")
        first = lean(str(base_dir), str(target), "--num-experts", "2")
        assert first.returncode == 0, first.stderr
        assert live.is_dir() and f"Left {live} alone: process {holder.pid}" in first.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    other = tmp_path / "other"
    second = lean(str(base_dir), str(other), "--num-experts", "2")
    assert second.returncode == 0, second.stderr
    assert f"Removed {live}, left by process {holder.pid}, which no longer runs" in second.stderr
    assert temporaries(target) == [] and (other / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "other"]


def test_a_temporary_without_a_process_id_is_named_not_removed(tmp_path, base_dir):
    target = tmp_path / "moe"
    older = tmp_path / ".moe.tmp-k2x9_q1z"  # what tempfile.mkdtemp named them before
    older.mkdir()
    out = lean(str(base_dir), str(target), "--num-experts", "2")
    assert out.returncode == 0, out.stderr
    assert f"WARNING fusion_bench_moect.io.checkpoint: {older} is the temporary" in out.stderr
    assert older.is_dir()


def test_overwrite_into_the_base_is_refused(tmp_path, base_dir):
    copy = shutil.copytree(base_dir, tmp_path / "base")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    out = lean(str(copy), str(copy), "--overwrite")
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: OUTPUT={copy} is the directory of '_pretrained_'")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


@pytest.fixture(scope="module")
def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (nothing when not root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None or subprocess.run([*DROP_ROOT_POWERS, "true"]).returncode:
        unavailable("as root, setpriv to drop the capabilities that bypass permissions")
    return DROP_ROOT_POWERS


def test_an_empty_read_only_target_is_replaced(tmp_path, base_dir, unprivileged):
    """Before: the whole build ran, then the final rename failed with a raw [Errno 13]
    and left .ro.old-*; the directory is now moved aside within its parent."""
    target = tmp_path / "ro"
    target.mkdir(mode=0o555)
    out = lean(str(base_dir), str(target), "--num-experts", "2", prefix=unprivileged, umask=0o022)
    assert out.returncode == 0, out.stderr
    assert (target / "model.safetensors").is_file() and temporaries(target) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_a_read_only_target_to_overwrite_fails_before_the_build(tmp_path, base_dir, unprivileged):
    target = tmp_path / "ro"
    target.mkdir()
    (target / "old.txt").write_text("keep")
    target.chmod(0o555)
    out = lean(str(base_dir), str(target), "--overwrite", prefix=unprivileged)
    assert out.returncode == 2 and "MoE-CT:" not in out.stderr  # the plan was never logged
    assert f"{target} is not writable, so the directory cannot be replaced" in out.stderr
    assert [p.name for p in target.iterdir()] == ["old.txt"] and temporaries(target) == []


def modes(directory: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of the directory and everything in it."""
    paths = [directory, *directory.rglob("*")]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_the_lean_cli_honours_the_umask(tmp_path, base_dir):
    out = lean(str(base_dir), str(tmp_path / "moe"), "--num-experts", "2", umask=0o027)
    assert out.returncode == 0, out.stderr
    assert modes(tmp_path / "moe") == {("dir", 0o750), ("file", 0o640)}


@pytest.mark.parametrize("writer", ["streamed", "in_memory"])
def test_every_writer_honours_the_umask(tmp_path, base_dir, writer, tiny_model):
    """transformers 5 writes model.safetensors 0600 through a temporary file: the in-memory
    writer (the one training uses) used to keep that."""
    target = tmp_path / "moe"
    mask = os.umask(0o027)
    try:
        if writer == "streamed":
            OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint=str(target)).run(
                pool({"_pretrained_": str(base_dir)}, tokenizer=str(base_dir))
            )
        else:
            dense = tiny_model("llama")
            save_checkpoint(perturbed(dense, 1), target)
    finally:
        os.umask(mask)
    assert modes(target) == {("dir", 0o750), ("file", 0o640)}


def test_an_unreadable_base_is_named_before_anything_loads(tmp_path, base_dir, unprivileged):
    locked = shutil.copytree(base_dir, tmp_path / "locked")
    (locked / "model.safetensors").chmod(0o200)
    out = lean(str(locked), str(tmp_path / "moe"), prefix=unprivileged)
    assert out.returncode == 2 and "MoE-CT:" not in out.stderr
    assert out.stderr.strip() == (
        f"error: Model '_pretrained_': {locked / 'model.safetensors'} cannot be read "
        "(permission denied); make it readable (chmod -R a+rX) or use a copy you can read."
    )
    locked.chmod(0o000)
    out = lean(str(locked), str(tmp_path / "moe"), prefix=unprivileged)
    assert out.stderr.startswith(f"error: Model '_pretrained_': {locked} cannot be read (perm")
    locked.chmod(0o755)
