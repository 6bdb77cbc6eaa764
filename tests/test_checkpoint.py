"""docs/algorithm.md, "The saved checkpoint": atomic Hugging Face checkpoints that reload in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import perturbed, pool, reload_logits
from safetensors import safe_open

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

# Version-sensitive (save and reload under this major, config keys transformers 4 needs): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


def hub_keys(directory: Path) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize(
    "family, arch, dtype, expected_keys",
    [
        (
            "llama",
            "mixtral",
            "float32",
            {
                "model.layers.1.block_sparse_moe.gate.weight",
                "model.layers.1.block_sparse_moe.experts.2.w1.weight",
                "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                "model.layers.1.block_sparse_moe.experts.2.w2.weight",
            },
        ),
        (
            "llama",
            "qwen2_moe",
            "bfloat16",
            {
                "model.layers.0.mlp.gate.weight",
                "model.layers.0.mlp.experts.2.gate_proj.weight",
                "model.layers.0.mlp.shared_expert.down_proj.weight",
                "model.layers.0.mlp.shared_expert_gate.weight",
                "model.layers.0.self_attn.q_proj.bias",
            },
        ),
        (
            "qwen3",
            "qwen3_moe",
            "float32",
            {
                "model.layers.0.mlp.experts.3.down_proj.weight",
                "model.layers.0.self_attn.q_norm.weight",
            },
        ),
        (
            "qwen2",
            "glm4_moe",
            "bfloat16",
            {
                "model.layers.1.mlp.gate.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias",
                "model.layers.1.mlp.experts.3.up_proj.weight",
                "model.layers.1.mlp.shared_experts.down_proj.weight",
                "model.layers.0.self_attn.q_proj.bias",
            },
        ),
    ],
)
def test_saved_checkpoint_reloads_in_a_fresh_process(
    tmp_path, saved, real_ids, family, arch, dtype, expected_keys, tiny_model, tokenizer_dir
):
    dense = tiny_model(family)
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    out_dir = tmp_path / "moe"
    algo = OrthogonalMoECTMergingAlgorithm(
        architecture=arch,
        granularity=2,
        experts_per_token=2,
        dtype=dtype,
        save_checkpoint=str(out_dir),
    )
    moe = algo.run(pool(models, tokenizer=str(tokenizer_dir)))
    with torch.no_grad():
        expected = moe(real_ids).logits
    logits, stdout = reload_logits(out_dir, real_ids, tmp_path)
    assert dtype in stdout
    assert torch.equal(logits, expected)
    assert expected_keys <= hub_keys(out_dir)
    # the record: every algorithm parameter, the expert order and the per-layer alphas
    config = json.loads((out_dir / "config.json").read_text())
    record = config["moe_ct"]
    assert record["experts"] == ["_pretrained_/0", "_pretrained_/1", "ft/0", "ft/1"]
    assert record["alphas"] == pytest.approx([0.8, 0.8])
    assert record["anchor_experts"] == [0, 1]
    assert record["params"] == algo.parameters_record()
    assert {"gate_mode", "base_alpha", "alpha_strategy", "router_aux_scale", "granularity"} <= set(
        record["params"]
    )
    assert record["params"]["save_checkpoint"] == str(out_dir)
    assert (out_dir / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe.")]


def test_existing_non_empty_directory_is_refused_then_overwritten(tmp_path, saved, tiny_model):
    base = saved(tiny_model("llama"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    algo = OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint=str(out_dir))
    with pytest.raises(
        FileExistsError, match="is not empty; choose a new directory or set overwrite"
    ):
        algo.run(pool({"_pretrained_": base}))
    assert (out_dir / "keep.txt").read_text() == "precious"
    OrthogonalMoECTMergingAlgorithm(
        num_experts=2, save_checkpoint=str(out_dir), overwrite=True
    ).run(pool({"_pretrained_": base}))
    assert (out_dir / "config.json").is_file() and not (out_dir / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", Path(base).name])


def test_empty_existing_directory_is_accepted(tmp_path, saved, tiny_model):
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint=str(out_dir)).run(
        pool({"_pretrained_": saved(tiny_model("llama"))})
    )
    assert (out_dir / "config.json").is_file()


class _FailingTokenizer:
    """A tokenizer whose save fails half-way, after the model files are written."""

    def save_pretrained(self, directory):
        Path(directory, "tokenizer_config.json").write_text("{}")
        raise OSError("disk full")


def test_a_failure_while_saving_leaves_nothing(tmp_path, saved, tiny_model):
    from fusion_bench_moect.io.checkpoint import save_checkpoint

    model = OrthogonalMoECTMergingAlgorithm(num_experts=2).run(
        pool({"_pretrained_": saved(tiny_model("llama"), "base")})
    )
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "out", tokenizer=_FailingTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
