"""Checkpoints load across transformers majors: saved under 5.x, read by 4.57, and back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import add_tokenizer, perturbed, pool, real_text, reload_logits
from transformers import AutoTokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

# Version-sensitive (checkpoints loaded under the other major): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


@pytest.mark.parametrize(
    "family, arch",
    [("llama", "mixtral"), ("llama", "qwen2_moe"), ("qwen3", "qwen3_moe"), ("qwen3", "glm4_moe")],
)
def test_checkpoint_loads_under_the_other_major(
    tmp_path, saved, real_ids, other_python, tiny_model, family, arch
):
    dense = tiny_model(family)
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
    logits, _ = reload_logits(out_dir, real_ids, tmp_path, python=other_python)
    assert (logits - expected).abs().max().item() < 1e-5


TOKENIZE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"ids": tok(sys.argv[2])["input_ids"], "eos": tok.eos_token}))
"""


def write_with(writer: str, base: Path, out: Path) -> None:
    """A checkpoint with the base's tokenizer, through one of the three writers."""
    if writer == "lean":
        from fusion_bench_moect.cli.upcycle import main

        assert main([str(base), str(out), "--num-experts", "2", "-q"]) == 0
        return
    models = pool({"_pretrained_": str(base)}, tokenizer=str(base))
    if writer == "streamed":
        OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint=str(out)).run(models)
    else:  # in memory, as a trained model is saved
        from fusion_bench_moect.io.checkpoint import save_checkpoint

        model = OrthogonalMoECTMergingAlgorithm(num_experts=2).run(models)
        save_checkpoint(model, out, models.load_tokenizer())


@pytest.mark.parametrize("writer", ["streamed", "in_memory", "lean"])
def test_tokenizer_loads_under_the_other_major(
    tmp_path, other_python, tiny_model, tokenizer_dir, writer
):
    """The tokenizer saved by this major (transformers 5 names its class TokenizersBackend,
    which 4.57 cannot load) tokenizes real text the same under the other major."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    add_tokenizer(tokenizer_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    write_with(writer, base, tmp_path / "moe")
    text = real_text()[:600]
    out = subprocess.run(
        [other_python, "-c", TOKENIZE, str(tmp_path / "moe"), text],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"ids": tokenizer(text)["input_ids"], "eos": "<eos>"}
