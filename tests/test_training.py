"""moe_ct_training: what is frozen stays bit-identical; what trains changes; balance is logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expert_stacks, pool, real_text, reload_logits, train_moe, train_tokenizer

from fusion_bench_moect.training import MoECTTrainingAlgorithm

#: Version-sensitive (this major's expert layout: frozen anchors, saved and reloaded trained
#: checkpoints, routing during training): these also run under transformers 4.57.
cross_version = pytest.mark.cross_version


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@cross_version
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_router_stage_changes_only_routers(moe_checkpoint, tokenizer_dir, arch):
    moe_dir, moe = moe_checkpoint(arch)
    before = moe.state_dict()
    algo, trained = train_moe(moe_dir, str(tokenizer_dir), stage="router")
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


@cross_version
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_expert_stage_keeps_anchor_and_shared_expert_bit_identical(
    moe_checkpoint, tokenizer_dir, arch
):
    moe_dir, moe = moe_checkpoint(arch)
    anchor_before = [
        tuple(t[0].detach().clone() for t in expert_stacks(moe, layer)) for layer in range(2)
    ]
    other_before = [
        tuple(t[1].detach().clone() for t in expert_stacks(moe, layer)) for layer in range(2)
    ]
    before = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    _, trained = train_moe(moe_dir, str(tokenizer_dir), stage="experts")
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


@cross_version
def test_training_saves_checkpoint_with_history(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint()
    out = tmp_path / "trained"
    train_moe(moe_dir, str(tokenizer_dir), stage="router", save_checkpoint=str(out))
    history = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in history["train"]] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["moe_ct_training"]["params"]["stage"] == "router"
    assert config["moe_ct"]["anchor_experts"] == [0]


@cross_version
def test_trained_checkpoint_loads_under_the_other_major(
    moe_checkpoint, tokenizer_dir, tmp_path, real_ids, other_python
):
    moe_dir, _ = moe_checkpoint()
    out = tmp_path / "trained"
    _, trained = train_moe(moe_dir, str(tokenizer_dir), stage="experts", save_checkpoint=str(out))
    with torch.no_grad():
        expected = trained(real_ids).logits
    logits, _ = reload_logits(out, real_ids, tmp_path, python=other_python)
    assert (logits - expected).abs().max().item() < 1e-5


def test_dense_model_is_refused(saved, tokenizer_dir, tiny_model):
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}], max_steps=1, seq_len=16, accelerator="cpu"
    )
    with pytest.raises(ValueError, match="needs an MoE model"):
        algo.run(pool({"_pretrained_": saved(tiny_model("llama"))}, tokenizer=str(tokenizer_dir)))


@cross_version
def test_a_model_object_trains_with_the_method_tokenizer(moe_checkpoint, tokenizer_dir):
    moe_dir, moe = moe_checkpoint()
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
        tokenizer=str(tokenizer_dir),
    )
    assert algo.run(moe) is moe and len(algo.history) == 1


def test_method_yaml_and_docs_table_are_generated_from_the_schema():
    from fusion_bench_moect.training.config import method_yaml, parameter_table

    root = Path(__file__).resolve().parents[1]
    hint = 'regenerate: python -c "from fusion_bench_moect.training.config import method_yaml"'
    assert (root / "config/method/moe_ct_training.yaml").read_text() == method_yaml(), hint
    assert parameter_table() in (root / "docs/training.md").read_text()
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(root / "config/method/moe_ct_training.yaml")
    algo = MoECTTrainingAlgorithm(**{k: v for k, v in yaml.items() if k != "_target_"})
    assert algo.training_config.train_sources["de"] == {"debian_reference": "de", "split": "train"}


@pytest.mark.parametrize(
    "params, match",
    [
        ({"stage": "routers"}, "Unknown stage 'routers'"),
        ({"stage": "router_then_experts"}, "router_warmup_steps >= 1"),
        ({"max_steps": -1}, "both -1"),
        ({"max_steps": 0}, r"max_steps must be >= 1 \(or -1 for no limit\), got 0"),
        ({"learning_rate": -1e-3}, r"learning_rate must lie in \(0, inf\), got -0.001"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
        ({"min_learning_rate": 1.0}, "min_learning_rate=1.0 exceeds learning_rate"),
        ({"optimizer": {"lr": 1}}, "optimizer must be null or a config with a _target_"),
        ({"keep_last": 0}, "keep_last must be >= 1"),
        ({"experts_implementation": "fast"}, "valid: eager, batched_mm, grouped_mm"),
    ],
)
def test_bad_settings_fail_when_the_algorithm_is_made(params, match):
    with pytest.raises(ValueError, match=match):
        MoECTTrainingAlgorithm(train_sources=[{"text": "x"}], **params)


def test_warm_up_starts_above_zero():
    from fusion_bench_moect.training.config import TrainingConfig
    from fusion_bench_moect.training.optim import build_scheduler

    params = [torch.nn.Parameter(torch.zeros(1))]
    config = TrainingConfig(train_sources=["x"], warmup_steps=1, learning_rate=1e-3)
    optimizer = torch.optim.AdamW(params, lr=1.0)
    scheduler = build_scheduler(config, optimizer, total=4)
    rates = [scheduler.step() for _ in range(4)]
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)
    assert all(r > 0 for r in rates) and rates[3] < rates[2] < rates[1]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"stage": "experts", "anchor_experts": [0, 7]}, r"Anchor expert\(s\) \[7\] do not exist"),
        ({"seq_len": 100_000}, "fewer than one window of seq_len=100000"),
        ({"batch_size": 10_000, "seq_len": 8}, "fewer than one global batch"),
        ({"ckpt_path": "/nonexistent/step-000002"}, "step-000002 does not exist; give a step-"),
        ({"train_sources": {"x": "/nonexistent/corpus.txt"}}, "does not exist"),
    ],
)
def test_bad_settings_fail_before_training(moe_checkpoint, tokenizer_dir, params, match):
    moe_dir, _ = moe_checkpoint()
    algo = MoECTTrainingAlgorithm(
        **{
            "train_sources": [{"text": real_text()}],
            "max_steps": 1,
            "seq_len": 16,
            "accelerator": "cpu",
            **params,
        }
    )
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        algo.run(pool({"_pretrained_": moe_dir}, tokenizer=str(tokenizer_dir)))
    assert algo.history == []


def test_a_tokenizer_of_another_model_is_refused(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint()
    big = tmp_path / "big_tok"
    train_tokenizer(big, vocab_size=600, extra=real_text()[::-1])
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}], max_steps=1, seq_len=16, accelerator="cpu"
    )
    with pytest.raises(ValueError, match="does not belong to this model"):
        algo.run(pool({"_pretrained_": moe_dir}, tokenizer=str(big)))


@cross_version
def test_evaluation_during_training_writes_curves(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint("qwen2_moe")
    out = tmp_path / "trained"
    algo, _ = train_moe(
        moe_dir,
        str(tokenizer_dir),
        stage="experts",
        max_steps=4,
        eval_sources={"gpl": {"text": real_text()[::2]}},
        eval_every=2,
        eval_max_tokens_per_source=256,
        save_checkpoint=str(out),
    )
    assert [e["step"] for e in algo.evaluations] == [0, 2, 4]
    assert all(e["perplexity"]["gpl"] > 1 and e["mean_cv"] is not None for e in algo.evaluations)
    history = json.loads((out / "training_history.json").read_text())
    assert history["eval"] == algo.evaluations
    assert (out / "training_history.png").stat().st_size > 10_000


def test_a_given_fabric_and_its_logger_are_used(moe_checkpoint, tokenizer_dir, tmp_path):
    """The algorithm trains on the Fabric it is handed (as the FusionBench program does) and
    logs every step to its loggers, also metrics that are undefined (no anchors)."""
    import lightning as L
    from lightning.fabric.loggers import CSVLogger

    moe_dir, _ = moe_checkpoint()
    algo = MoECTTrainingAlgorithm(
        train_sources=[{"text": real_text()}],
        max_steps=2,
        batch_size=2,
        seq_len=16,
        anchor_experts=[],
        log_every=1,
    )
    algo.fabric = L.Fabric(
        accelerator="cpu", devices=1, loggers=CSVLogger(tmp_path, name="run", version=0)
    )
    algo.fabric.launch()
    algo.run(pool({"_pretrained_": moe_dir}, tokenizer=str(tokenizer_dir)))
    algo.fabric.logger.finalize("success")
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/loss", "train/lr", "train/mean_cv", "train/tokens_per_s"} <= set(header)
    assert "train/mean_anchor_share" not in header and len(rows) == 3
    assert (tmp_path / "run" / "version_0" / "training_history.png").is_file()


@pytest.mark.skipif(
    int(__import__("transformers").__version__.split(".")[0]) < 5,
    reason="the docs' table is computed under transformers 5 (stacked experts, anchor rows included)",
)
def test_the_at_scale_table_in_the_docs_is_the_code_s():
    """docs/training.md's memory table is what benchmarks/at_scale.py computes (meta device)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("at_scale", root / "benchmarks/at_scale.py")
    at_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(at_scale)
    table = at_scale.table()
    assert table in (root / "docs/training.md").read_text(), "run benchmarks/at_scale.py --write"
    # a row by hand: Llama-3.2-1B router stage = 16 layers x 8 experts x 2048 router weights
    assert "| Llama-3.2-1B | `router` | 6.87B | 0.26M |" in table


def test_the_run_record_reads_the_fabric_that_trains():
    """Issue 29: ``config.moe_ct_training`` recorded the method's ``accelerator: auto,
    precision: 32-true`` whatever ran; the record now comes from the Fabric itself."""
    import lightning as L

    from fusion_bench_moect.training.runtime import training_record

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    record = training_record(
        {"accelerator": "auto", "precision": "32-true"}, fabric, torch.nn.Linear(2, 2)
    )
    assert record == {
        "params": {"accelerator": "cpu", "precision": "bf16-mixed"},
        "run": {
            "strategy": "SingleDeviceStrategy",
            "sharded": False,
            "processes": 1,
            "nodes": 1,
            "accelerator": "cpu",
            "precision": "bf16-mixed",
            "mixed_precision": {
                "by": "fabric",
                "compute_dtype": "bfloat16",
                "weight_dtype": "float32",
            },
        },
    }
