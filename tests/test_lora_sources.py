"""PEFT LoRA adapter directories as sources: base + low-rank update, equal to PEFT's merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import pool

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.io.sources import SourceError

# Version-sensitive (adapter experts against PEFT's merge under this major): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version

FFN = ["gate_proj", "up_proj", "down_proj"]
#: Float32 adapter vs PEFT-merged source: the same float32 operations (B @ A * scaling, then
#: added to the base weight), so the experts are bit-identical; measured max |diff| 0.
TOL = 0.0


def train_adapter(
    untied_base_dir: str, out_dir, ids: torch.Tensor, targets=FFN, steps: int = 4, **cfg
):
    """Train a LoRA adapter with PEFT for a few steps on real text; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(untied_base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **cfg)
    peft_model = get_peft_model(model, config)
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.fixture
def untied_base_dir(saved, tiny_model):
    """A saved tiny Llama with untied input and output embeddings."""
    return saved(tiny_model("llama", tie_word_embeddings=False), "base")


def moe_params(models: dict, **kwargs) -> dict[str, torch.Tensor]:
    algo = OrthogonalMoECTMergingAlgorithm(
        alpha_strategy="constant", base_alpha=0.8, dtype="float32", **kwargs
    )
    return dict(algo.run(pool(models)).state_dict())


def test_adapter_expert_equals_the_peft_merged_expert(saved, untied_base_dir, real_ids):
    adapter_dir = saved.root / "adapter"
    peft_model = train_adapter(untied_base_dir, adapter_dir, real_ids)
    merged_dir = saved(peft_model.merge_and_unload(), "merged")
    for arch in ("mixtral", "qwen2_moe", "glm4_moe"):
        from_adapter = moe_params(
            {"_pretrained_": untied_base_dir, "ft": str(adapter_dir)}, architecture=arch
        )
        from_merged = moe_params(
            {"_pretrained_": untied_base_dir, "ft": merged_dir}, architecture=arch
        )
        assert from_adapter.keys() == from_merged.keys()
        diff = max((from_adapter[k] - from_merged[k]).abs().max().item() for k in from_adapter)
        assert diff <= TOL
    # the adapter really changed the experts (trained: lora_B is no longer zero)
    base = moe_params({"_pretrained_": untied_base_dir, "ft": untied_base_dir}, architecture=arch)
    changed = [k for k in base if (base[k] - from_adapter[k]).abs().max() > 1e-4]
    assert changed and all(".mlp." in k for k in changed)


def test_adapter_over_attention_warns_naming_modules(saved, untied_base_dir, real_ids, caplog):
    adapter_dir = saved.root / "adapter"
    peft_model = train_adapter(
        untied_base_dir, adapter_dir, real_ids, targets=[*FFN, "q_proj"], steps=2
    )
    merged_dir = saved(peft_model.merge_and_unload(), "merged")
    with caplog.at_level(logging.WARNING):
        from_adapter = moe_params({"_pretrained_": untied_base_dir, "ft": str(adapter_dir)})
    assert "model.layers.0.self_attn.q_proj" in caplog.text
    assert "cannot go into experts" in caplog.text
    from_merged = moe_params({"_pretrained_": untied_base_dir, "ft": merged_dir})
    for key, tensor in from_adapter.items():  # experts equal; attention stays the base's
        assert torch.equal(tensor, from_merged[key]) or ".mlp." not in key


def test_rslora_and_alpha_pattern_scaling(saved, untied_base_dir, real_ids):
    adapter_dir = saved.root / "adapter"
    peft_model = train_adapter(
        untied_base_dir,
        adapter_dir,
        real_ids,
        steps=2,
        use_rslora=True,
        alpha_pattern={"down_proj": 3},
    )
    merged_dir = saved(peft_model.merge_and_unload(), "merged")
    from_adapter = moe_params({"_pretrained_": untied_base_dir, "ft": str(adapter_dir)})
    from_merged = moe_params({"_pretrained_": untied_base_dir, "ft": merged_dir})
    assert all(torch.equal(from_adapter[k], from_merged[k]) for k in from_adapter)


def test_lean_cli_reads_adapters(saved, untied_base_dir, real_ids):
    from safetensors.torch import load_file

    from fusion_bench_moect.cli.upcycle import main

    adapter_dir = saved.root / "adapter"
    merged_dir = saved(
        train_adapter(untied_base_dir, adapter_dir, real_ids).merge_and_unload(), "m"
    )
    outs = {}
    for label, src in (("adapter", adapter_dir), ("merged", merged_dir)):
        out = saved.root / f"out_{label}"
        args = [untied_base_dir, str(out), "--source", f"ft={src}", "--dtype", "float32", "-q"]
        assert main(args) == 0
        outs[label] = load_file(out / "model.safetensors")
    assert all(torch.equal(outs["adapter"][k], outs["merged"][k]) for k in outs["merged"])


def peft_adapter(saved, untied_base_dir, config, safe: bool = True) -> str:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(untied_base_dir)
    directory = saved.root / f"adapter_{len(list(saved.root.iterdir()))}"
    get_peft_model(model, config).save_pretrained(directory, safe_serialization=safe)
    return str(directory)


def test_bad_adapters_get_clear_errors(saved, untied_base_dir, tiny_model):
    from peft import IA3Config, LoraConfig

    def fails(directory, match):
        with pytest.raises(SourceError, match=match):
            OrthogonalMoECTMergingAlgorithm().run(
                pool({"_pretrained_": untied_base_dir, "ft": directory})
            )

    fails(
        peft_adapter(saved, untied_base_dir, LoraConfig(target_modules=FFN, use_dora=True)), "DoRA"
    )
    ia3 = IA3Config(target_modules=FFN, feedforward_modules=["down_proj"])
    fails(peft_adapter(saved, untied_base_dir, ia3), "IA3 adapter; only LoRA")
    pickled = peft_adapter(saved, untied_base_dir, LoraConfig(target_modules=FFN), safe=False)
    fails(pickled, "only pickled weights")
    fails(
        peft_adapter(saved, untied_base_dir, LoraConfig(target_modules=["q_proj"])),
        "no FFN projection",
    )
    # another base: a different name, then (same name) different shapes
    other_dir = saved(tiny_model("llama", intermediate_size=32), "other")
    other = peft_adapter(saved, other_dir, LoraConfig(target_modules=FFN))
    fails(other, "was trained on '.*other', not on the base")
    config_file = Path(other) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = untied_base_dir
    config_file.write_text(json.dumps(config))
    fails(other, r"down_proj. is \(72 x 8\) @ \(8 x 32\) but the base weight is 72 x 64")
    # an adapter cannot be the base
    with pytest.raises(SourceError, match="PEFT adapter, not a full model"):
        OrthogonalMoECTMergingAlgorithm().run(pool({"_pretrained_": other}))
