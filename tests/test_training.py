"""moe_ct_training: what is frozen stays bit-identical; what trains changes; balance is logged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, perturbed, pool, real_text, train_tokenizer
from test_experts import expert_stacks

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.training import MoECTTrainingAlgorithm


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(directory)
    return str(directory)


def build(saved, tok_dir, arch="mixtral"):
    """Step 1 of the workflow: upcycle + merge, saved as a checkpoint."""
    dense = make_model("llama")
    models = {
        "_pretrained_": saved(dense),
        "de": saved(perturbed(dense, 1)),
        "fr": saved(perturbed(dense, 2)),
    }
    directory = saved.root / f"moe_{arch}"
    moe = OrthogonalMoECTMergingAlgorithm(
        architecture=arch, dtype="float32", save_checkpoint=str(directory)
    ).run(pool(models, tokenizer=tok_dir))
    return str(directory), moe


def train(moe_dir, tok_dir, **params):
    """Step 2: continual training of the saved MoE through a FusionBench pool."""
    algo = MoECTTrainingAlgorithm(
        train_sources={"gpl": {"text": real_text()}},
        max_steps=3,
        batch_size=2,
        seq_len=32,
        learning_rate=1e-2,
        accelerator="cpu",
        **params,
    )
    return algo, algo.run(
        pool({"_pretrained_": moe_dir}, tokenizer=tok_dir, model_kwargs={"torch_dtype": "float32"})
    )


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_router_stage_changes_only_routers(saved, tok_dir, arch):
    moe_dir, moe = build(saved, tok_dir, arch)
    before = moe.state_dict()
    algo, trained = train(moe_dir, tok_dir, stage="router")
    diff = changed(before, trained.state_dict())
    assert diff and all(k.endswith("gate.weight") and "shared_expert_gate" not in k for k in diff)
    assert len(algo.history) == 3
    for key in (
        "loss",
        "aux_loss",
        "mean_cv",
        "mean_max_violation",
        "mean_router_entropy",
        "dead_experts",
    ):
        assert key in algo.history[-1]
    assert algo.history[-1]["aux_loss"] > 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_expert_stage_keeps_anchor_and_shared_expert_bit_identical(saved, tok_dir, arch):
    moe_dir, moe = build(saved, tok_dir, arch)
    anchor_before = [
        tuple(t[0].detach().clone() for t in expert_stacks(moe, layer)) for layer in range(2)
    ]
    other_before = [
        tuple(t[1].detach().clone() for t in expert_stacks(moe, layer)) for layer in range(2)
    ]
    before = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    _, trained = train(moe_dir, tok_dir, stage="experts")
    after = trained.state_dict()
    for layer in range(2):
        stacks = expert_stacks(trained, layer)
        assert all(torch.equal(s[0], b) for s, b in zip(stacks, anchor_before[layer], strict=True))
        assert not all(
            torch.equal(s[1], b) for s, b in zip(stacks, other_before[layer], strict=True)
        )
    for key in before:
        frozen = (
            not any(part in key for part in (".experts.", "gate.weight")) or "shared_expert" in key
        )
        if frozen:
            assert torch.equal(before[key], after[key]), key


def test_training_saves_checkpoint_with_history(saved, tok_dir, tmp_path):
    moe_dir, _ = build(saved, tok_dir)
    out = tmp_path / "trained"
    train(moe_dir, tok_dir, stage="router", save_checkpoint=str(out))
    history = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["moe_ct_training"]["params"]["stage"] == "router"
    assert config["moe_ct"]["anchor_experts"] == [0]


def test_dense_model_is_refused(saved, tok_dir):
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}], max_steps=1, seq_len=16, accelerator="cpu"
    )
    with pytest.raises(ValueError, match="needs an MoE model"):
        algo.run(pool({"_pretrained_": saved(make_model("llama"))}, tokenizer=tok_dir))


def test_a_model_object_trains_with_the_method_tokenizer(saved, tok_dir):
    moe_dir, moe = build(saved, tok_dir)
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}],
        max_steps=1,
        batch_size=1,
        seq_len=16,
        accelerator="cpu",
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        algo.run(moe)
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}],
        max_steps=1,
        batch_size=1,
        seq_len=16,
        accelerator="cpu",
        tokenizer=tok_dir,
    )
    assert algo.run(moe) is moe and len(algo.history) == 1
