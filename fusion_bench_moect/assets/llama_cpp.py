"""llama.cpp's sources, offline-ready, from the PyPI sdist ``llama-cpp-python==0.3.36``.

The sdist vendors llama.cpp under ``vendor/llama.cpp``: its GGUF converter
(``convert_hf_to_gguf.py`` with the ``conversion/`` package and ``gguf-py``) and the C++
sources ``benchmarks/interop.py`` builds ``llama-perplexity`` from. We fetch the sdist alone
with pip (``pip download --no-deps --no-binary llama-cpp-python``: the sdist), check its
sha256 and unpack it once into ``llama_cpp_root()``:
``$MOECT_LLAMA_CPP_DIR``, else ``$FUSION_BENCH_MOECT_CACHE/llama.cpp``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..paths import cache_root
from .smollm2 import sha256_file

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Environment variable naming where the sdist is unpacked (and interop.py builds).
ROOT_ENV = "MOECT_LLAMA_CPP_DIR"


class LlamaCppError(RuntimeError):
    """llama.cpp's sources could not be fetched or verified."""


def llama_cpp_root() -> Path:
    """``$MOECT_LLAMA_CPP_DIR``, else ``cache_root() / "llama.cpp"``."""
    value = os.environ.get(ROOT_ENV)
    return Path(value).expanduser() if value else cache_root() / "llama.cpp"


def vendored_source(root: Path | None = None) -> Path:
    """Where the sdist's llama.cpp lies once unpacked (it may not exist yet)."""
    root = llama_cpp_root() if root is None else root
    return root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def _download(root: Path) -> Path:
    """``pip download`` the pinned sdist into ``root``; its sha256 is checked."""
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST_NAME
    if not sdist.is_file() or sha256_file(sdist) != SDIST_SHA256:
        sdist.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}"]
        command += ["--no-binary", PACKAGE, "--no-deps", "--disable-pip-version-check"]
        log.info("Fetching %s==%s from PyPI (77 MB): %s", PACKAGE, VERSION, " ".join(command))
        result = subprocess.run(command + ["-d", str(root)], capture_output=True, text=True)
        if result.returncode != 0 or not sdist.is_file():
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise LlamaCppError(f"Could not download {PACKAGE}=={VERSION} (no network?).\n{tail}")
    if (digest := sha256_file(sdist)) != SDIST_SHA256:
        raise LlamaCppError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; delete it.")
    return sdist


def fetch_llama_cpp(root: Path | None = None) -> Path:
    """The vendored llama.cpp of the pinned sdist, downloaded and unpacked once.

    Args:
        root: Where to keep the sdist and its unpacked tree (default ``llama_cpp_root()``).

    Returns:
        The directory holding ``convert_hf_to_gguf.py``.

    Raises:
        LlamaCppError: Download failure (offline) or a hash mismatch.
    """
    root = llama_cpp_root() if root is None else root
    source = vendored_source(root)
    if (source / "convert_hf_to_gguf.py").is_file():
        return source
    sdist = _download(root)
    # Unpacked beside, then renamed: a killed run leaves no half tree where the check looks.
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"llama_cpp_python-{VERSION}", root / f"llama_cpp_python-{VERSION}")
    return source
