"""Shared fixtures: tiny real transformers models and one tokenizer, saved to temp dirs.

Every fixture is defined here once; test modules take them as arguments and import plain
helpers from ``helpers.py``, never from this file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from helpers import (
    REPO,
    add_tokenizer,
    in_ci,
    make_tiny_model,
    perturbed,
    pool,
    real_text,
    save,
    train_tokenizer,
    unavailable,
)

THIS_MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="session", autouse=True)
def _token_stores(tmp_path_factory):
    """Training runs of the tests keep their token stores in a temporary folder, not in the
    user's cache (subprocesses inherit the variable)."""
    os.environ["FUSION_BENCH_MOECT_TOKEN_STORES"] = str(tmp_path_factory.mktemp("token_stores"))


@pytest.fixture(scope="session")
def tiny_model():
    """The one tiny-model factory: ``tiny_model(family, seed=0, layers=2, **config_overrides)``
    for the dense families (llama, mistral, qwen2, qwen3) and the MoE ones (mixtral,
    qwen2_moe, qwen3_moe)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The one tokenizer: a byte-level BPE trained on real text (``helpers.train_tokenizer``),
    vocabulary ``VOCAB``, ``<eos>`` as EOS; a read-only directory."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def real_ids() -> torch.Tensor:
    """Real text as byte-level token ids, shape (2, 24)."""
    data = list(real_text().encode("utf-8")[:48])
    return torch.tensor(data, dtype=torch.long).view(2, 24)


@pytest.fixture
def saved(tmp_path):
    """Save a model into a fresh sub-directory and return its path."""
    counter = iter(range(10_000))

    def _save(model, name: str | None = None) -> str:
        return save(model, tmp_path / (name or f"model_{next(counter)}"))

    _save.root = tmp_path
    return _save


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_model, tokenizer_dir) -> Path:
    """A saved tiny Llama base (seed 0, 2 layers) with the tokenizer's files; read-only."""
    directory = tmp_path_factory.mktemp("models") / "base"
    save(tiny_model("llama"), directory)
    add_tokenizer(tokenizer_dir, directory)
    return directory


@pytest.fixture
def moe_checkpoint(saved, tiny_model, tokenizer_dir):
    """``moe_checkpoint(arch="mixtral") -> (directory, model)``: a tiny Llama base and two
    fine-tunes (de, fr) upcycled and merged with the defaults, saved with the tokenizer."""
    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

    def build(arch: str = "mixtral"):
        dense = tiny_model("llama")
        models = {
            "_pretrained_": saved(dense),
            "de": saved(perturbed(dense, 1)),
            "fr": saved(perturbed(dense, 2)),
        }
        directory = saved.root / f"moe_{arch}"
        moe = OrthogonalMoECTMergingAlgorithm(
            architecture=arch, dtype="float32", save_checkpoint=str(directory)
        ).run(pool(models, tokenizer=str(tokenizer_dir)))
        return str(directory), moe

    return build


def _find_other_python() -> str | None:
    explicit = os.environ.get("MOECT_OTHER_PYTHON")
    candidates = (
        [explicit] if explicit else [str(REPO / v / "bin/python") for v in (".venv", ".venv-tf4")]
    )
    for python in candidates:
        if not python or not Path(python).is_file():
            continue
        probe = subprocess.run(
            [python, "-c", "import transformers; print(transformers.__version__)"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and int(probe.stdout.split(".")[0]) != THIS_MAJOR:
            return python
    return None


@pytest.fixture(scope="session")
def other_python() -> str:
    """The interpreter of the virtualenv with the other transformers major
    (``MOECT_OTHER_PYTHON``, else ``.venv`` / ``.venv-tf4``); a failure in CI when missing."""
    found = _find_other_python()
    if found is None:
        unavailable("the other transformers major (MOECT_OTHER_PYTHON; run scripts/test.sh)")
    return found


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct (``python -m fusion_bench_moect.cli.smollm2``);
    prepared here in CI, a skip elsewhere when missing."""
    from fusion_bench_moect.assets.smollm2 import default_model_dir, is_prepared, prepare_smollm2

    if not is_prepared(default_model_dir(), verify_hashes=False) and not in_ci():
        unavailable(
            f"SmolLM2 is not prepared in {default_model_dir()}; run: "
            "python -m fusion_bench_moect.cli.smollm2"
        )
    return prepare_smollm2()


@pytest.fixture(scope="session")
def debian_reference():
    """``debian_reference(*langs)``: a skip (a failure in CI) unless the Debian Reference of
    every language is installed."""
    from fusion_bench_moect.data.text import apt_install_command, debian_reference_available

    def require(*langs: str) -> None:
        if not all(debian_reference_available(lang) for lang in langs):
            unavailable(f"Debian Reference not installed; run: {apt_install_command(langs)}")

    return require


@pytest.fixture(scope="session")
def llama_cpp_tree() -> Path:
    """llama.cpp's converter (``vendor/llama.cpp`` of the llama-cpp-python sdist,
    ``assets/llama_cpp.py``); fetched here in CI, a skip elsewhere when missing."""
    from fusion_bench_moect.assets.llama_cpp import fetch_llama_cpp, vendored_source

    if not (vendored_source() / "convert_hf_to_gguf.py").is_file() and not in_ci():
        unavailable(f"llama.cpp is not in {vendored_source()}; run: scripts/setup.sh --interop")
    return fetch_llama_cpp()
