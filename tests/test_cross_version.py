"""Checkpoints load across transformers majors: saved under 5.x, read by 4.57, and back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from conftest import in_ci, make_model, perturbed, pool
from test_checkpoint import reload_logits

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

REPO = Path(__file__).resolve().parents[1]
THIS_MAJOR = int(transformers.__version__.split(".")[0])


def other_python() -> str | None:
    """The interpreter of the virtualenv with the other transformers major."""
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


@pytest.fixture(scope="module")
def python():
    found = other_python()
    if found is None:
        if in_ci():
            pytest.fail("CI must provide the other transformers major (MOECT_OTHER_PYTHON)")
        pytest.skip("no virtualenv with the other transformers major (run scripts/test.sh)")
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, arch",
    [("llama", "mixtral"), ("llama", "qwen2_moe"), ("qwen3", "qwen3_moe"), ("qwen3", "glm4_moe")],
)
def test_checkpoint_loads_under_the_other_major(tmp_path, saved, real_ids, python, family, arch):
    dense = make_model(family)
    out_dir = tmp_path / "moe"
    moe = OrthogonalMoECTMergingAlgorithm(
        architecture=arch,
        granularity=2,
        experts_per_token=2,
        dtype="float32",
        save_checkpoint=str(out_dir),
    ).run(pool({"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}))
    with torch.no_grad():
        expected = moe(real_ids).logits
    logits, _ = reload_logits(out_dir, real_ids, tmp_path, python=python)
    assert (logits - expected).abs().max().item() < 1e-5
