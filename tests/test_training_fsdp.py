"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo):
the shipped preset shards every MoE decoder layer, trains to the DDP run's weights and keeps
frozen weights bit-identical (sharded resume: test_training_cli)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import expert_stacks, real_text, run_fabric, trainable_key, with_state
from hydra.utils import instantiate

from fusion_bench_moect.training.sharding import parallelize

# the same arithmetic as DDP up to the order of float sums (reduce-scatter vs all-reduce)
FSDP_TOLERANCE = 1e-6


def compose(*overrides):
    from pathlib import Path

    import fusion_bench
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    root = Path(fusion_bench.__file__).resolve().parents[1] / "fusion_bench_config"
    with initialize_config_dir(str(root), version_base=None):
        return hydra_compose("fabric_model_fusion", overrides=list(overrides))


def test_fsdp2_preset_is_a_model_parallel_fabric_sharding_every_decoder_layer():
    from lightning.fabric.strategies import ModelParallelStrategy

    config = compose("fabric=moe_fsdp2", "method=moe_ct_training")
    assert config.fabric.precision == "32-true"
    assert "TensorBoardLogger" in config.fabric.loggers._target_
    strategy = instantiate(config.fabric.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    fn = strategy._parallelize_fn
    assert isinstance(fn, functools.partial) and fn.func is parallelize
    assert fn.keywords == {
        "activation_checkpointing": False,
        "mixed_precision": "auto",
        "reshard_after_forward": True,
    }


def test_ddp_preset_builds_a_data_parallel_fabric():
    config = compose("fabric=moe_ddp", "fabric.accelerator=cpu", "fabric.devices=1")
    assert config.fabric.strategy == "ddp" and config.fabric.precision == "bf16-mixed"
    fabric = instantiate(config.fabric, precision="32-true", loggers=None)
    assert type(fabric.strategy).__name__ == "DDPStrategy"


def test_fsdp2_two_processes_train_like_ddp(moe_checkpoint, tokenizer_dir, tmp_path):
    # Qwen2-MoE: its shared expert too; Mixtral through the CLI in test_training_cli
    arch = "qwen2_moe"
    moe_dir, moe = moe_checkpoint(arch)
    before = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    extra = {
        "eval_sources": {"gpl": {"text": real_text()[::3]}},
        "eval_window": 64,
        "learning_rate": 1e-3,
    }
    ddp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "ddp", **extra)
    fsdp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "moe_fsdp2", **extra)
    reference, sharded = ddp["states"][0], fsdp["states"][0]
    assert set(sharded) == set(reference)
    worst = max((sharded[k] - reference[k]).abs().max().item() for k in reference)
    print(f"{arch}: max |FSDP2(2) - DDP(2)| = {worst:.3g}")
    assert worst < FSDP_TOLERANCE
    for key, value in sharded.items():
        if not trainable_key(key):
            assert torch.equal(value, before[key]), key
    for layer in range(2):  # anchor (expert 0) bit-identical, the others trained
        pairs = zip(
            expert_stacks(moe, layer), expert_stacks(with_state(moe, sharded), layer), strict=True
        )
        for stack_before, stack_after in pairs:
            assert torch.equal(stack_before[0], stack_after[0])
            assert not torch.equal(stack_before[1], stack_after[1])
    # evaluation during training ran under sharding, on the same numbers as DDP's
    evals = [(e["step"], e["perplexity"]["gpl"]) for e in fsdp["evaluations"]]
    assert [s for s, _ in evals] == [0, 3]
    for (_, mine), (_, theirs) in zip(
        evals, [(e["step"], e["perplexity"]["gpl"]) for e in ddp["evaluations"]], strict=True
    ):
        assert mine == pytest.approx(theirs, rel=1e-5)
