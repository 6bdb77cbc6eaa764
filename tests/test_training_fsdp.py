"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo):
the shipped preset shards every MoE decoder layer, trains to the DDP run's weights and keeps
frozen weights bit-identical (sharded resume: test_training_cli)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import expert_stacks, real_text, run_fabric, trainable_key, with_state
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fusion_bench_moect.io.sliced import CheckpointReader
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
    # sharded loading: each process read its own rows, together every byte once; DDP's
    # processes each loaded the whole model through the pool
    entries = CheckpointReader(moe_dir).entries.values()
    total = sum(e.row_bytes * (e.shape[0] if e.shape else 1) for e in entries)
    assert ddp["bytes_loaded"] == [0, 0]
    assert sum(fsdp["bytes_loaded"]) == total
    assert max(fsdp["bytes_loaded"]) < 0.6 * total
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


def bf16_copy(moe_dir: str, target: Path) -> Path:
    """The MoE of ``moe_dir`` stored in bf16 (the dtype a large MoE is built in)."""
    reader = CheckpointReader(moe_dir)
    target.mkdir()
    tensors = {name: reader.read(name).to(torch.bfloat16) for name in reader.entries}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for path in Path(moe_dir).iterdir():
        if path.is_file() and path.suffix == ".json":
            shutil.copy(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    config.update({"dtype": "bfloat16", "torch_dtype": "bfloat16"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_fsdp2_keeps_frozen_bf16_weights_as_stored_and_every_strategy_saves_the_same_tensors(
    moe_checkpoint, tokenizer_dir, tmp_path
):
    moe_dir, _ = moe_checkpoint("mixtral")  # tied embeddings: no lm_head.weight in the files
    source = bf16_copy(moe_dir, tmp_path / "bf16")
    inputs = load_file(str(source / "model.safetensors"))
    runs, saved = {}, {}
    for devices, strategy in ((1, "auto"), (2, "ddp"), (2, "moe_fsdp2")):
        out = tmp_path / f"out-{strategy}"
        runs[strategy] = run_fabric(
            tmp_path, str(source), str(tokenizer_dir), devices, strategy, save_checkpoint=str(out)
        )
        saved[strategy] = load_file(str(out / "model.safetensors"))
    # FSDP2 held the frozen weights in bf16 and float32 masters of what trains
    dtypes = runs["moe_fsdp2"]["dtypes"]
    masters = {n for n, d in dtypes.items() if d == torch.float32}
    assert masters and all(trainable_key(n) for n in masters)
    assert {d for n, d in dtypes.items() if n not in masters} == {torch.bfloat16}
    for strategy, tensors in saved.items():
        assert set(tensors) == set(inputs), strategy  # issue 29.5: no extra tied lm_head
        trained = {k for k, v in tensors.items() if v.dtype == torch.float32}
        assert trained and all(trainable_key(k) for k in trained), strategy
        for key, value in tensors.items():  # frozen: the input's bytes, in its dtype
            if key not in trained:
                assert value.dtype == torch.bfloat16 and torch.equal(value, inputs[key]), key
            elif ".experts.0." in key:  # the anchor: its stored value, in float32
                assert torch.equal(value.to(torch.bfloat16), inputs[key]), key
    # the sharded and the replicated run trained alike (both 2 processes)
    fsdp, ddp = saved["moe_fsdp2"], saved["ddp"]
    assert {k for k, v in fsdp.items() if v.dtype == torch.float32} == {
        k for k, v in ddp.items() if v.dtype == torch.float32
    }
    worst = max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp)
    assert 0 < max((fsdp[k].float() - inputs[k].float()).abs().max().item() for k in fsdp)
    assert worst < FSDP_TOLERANCE
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out-moe_fsdp2"))
    assert torch.equal(model.get_input_embeddings().weight, inputs["model.embed_tokens.weight"])
