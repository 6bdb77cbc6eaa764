"""Faults of the token store (docs/reliability.md): a build killed with SIGKILL at chosen
points leaves nothing that a later run reads as complete, and the next run rebuilds it; a full
disk gives one line and leaves the other stores intact."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import real_text
from transformers import AutoTokenizer

from fusion_bench_moect.data import store as store_module
from fusion_bench_moect.data.store import (
    StoreCorruptError,
    ensure_store,
    open_store,
    store_key,
    store_path,
    tokenizer_identity,
)
from fusion_bench_moect.io import checkpoint as checkpoint_module

POINTS = ["block 1", "block 3", "meta", "rename"]


def _kill_at(point: str, monkeypatch) -> None:
    """Arrange for this (child) process to SIGKILL itself at ``point`` of a build."""
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if point.startswith("block"):
        wanted, encode = int(point.split()[1]), store_module.encode_documents

        def counted(*args, **kwargs):
            for index, block in enumerate(encode(*args, **kwargs), start=1):
                if index == wanted:
                    die()
                yield block

        monkeypatch.setattr(store_module, "encode_documents", counted)
    elif point == "meta":
        monkeypatch.setattr(store_module.json, "dumps", die)
    else:
        monkeypatch.setattr(checkpoint_module, "_move_into_place", die)


def _build_in_child(tokenizer, spec, cache: Path, point: str, monkeypatch) -> str:
    pid = os.fork()
    if pid == 0:  # the child builds and is killed; it never returns to pytest
        try:
            _kill_at(point, monkeypatch)
            ensure_store(tokenizer, spec, "s", cache)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) else "finished"


@pytest.mark.parametrize("old", [False, True], ids=["new", "over-a-corrupt-one"])
def test_a_killed_build_is_never_read_as_complete(tokenizer_dir, tmp_path, monkeypatch, old):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(store_module, "BATCH_CHARS", 500)  # several blocks to be killed in
    monkeypatch.setattr(store_module, "PIECE_CHARS", 200)
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(real_text())
    spec = str(tmp_path / "docs")
    expected = ensure_store(tokenizer, spec, "s", tmp_path / "ref").tokens.tolist()
    key = store_key(spec, tokenizer_identity(tokenizer), None)
    for point in POINTS:
        cache = tmp_path / point.replace(" ", "")
        path = store_path(cache, "s", key)
        if old:  # a truncated store of the same key, being rebuilt
            ensure_store(tokenizer, spec, "s", cache)
            raw = (path / "tokens.bin").read_bytes()
            (path / "tokens.bin").write_bytes(raw[: len(raw) // 2])
        assert _build_in_child(tokenizer, spec, cache, point, monkeypatch) == "killed", point
        with pytest.raises(StoreCorruptError):  # absent, or the truncated old one: not complete
            open_store(path, key)
        store = ensure_store(tokenizer, spec, "s", cache)  # the next run rebuilds it
        assert store.tokens.tolist() == expected, point
        assert sorted(p.name for p in cache.iterdir()) == [path.name], point  # no temporaries


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root or CAP_SYS_ADMIN, as on the project's machines)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # maps may still be open


def test_a_full_disk_names_the_source_and_keeps_the_other_stores(tokenizer_dir, small_disk):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    small = ensure_store(tokenizer, {"text": real_text()}, "small", small_disk)
    big = {"text": real_text() * 400}  # about 2 MB of uint16 ids with this tokenizer
    with pytest.raises(OSError, match="Cannot write the token store of source 'big'") as err:
        ensure_store(tokenizer, big, "big", small_disk)
    assert err.value.errno == errno.ENOSPC and "free space there" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in small_disk.iterdir()) == [small.path.name]  # no leftovers
    assert open_store(small.path, verify=True).tokens.tolist() == small.tokens.tolist()
