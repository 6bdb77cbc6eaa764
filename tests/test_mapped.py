"""run() with save_checkpoint streams the MoE to disk and returns the written files mapped
copy-on-write (io/mapped.py): the same model as the in-memory build, without a copy."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BUILD_CASES, perturbed, pool, read_tensors, reload

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.arch.mixtral import MixtralArchitecture
from fusion_bench_moect.inspection import expert_triples, moe_block

# Version-sensitive (this major's model skeleton over a written checkpoint): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


@pytest.mark.parametrize("family, arch, dtype, extra", BUILD_CASES)
def test_saved_run_returns_the_checkpoint_mapped(
    tmp_path, saved, real_ids, family, arch, dtype, extra, tiny_model, tokenizer_dir
):
    dense = tiny_model(family, layers=3)
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    common = dict(architecture=arch, granularity=2, experts_per_token=2, dtype=dtype, **extra)
    built = OrthogonalMoECTMergingAlgorithm(**common).run(
        pool(models, tokenizer=str(tokenizer_dir))
    )
    out = tmp_path / "moe"
    mapped = OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(out), **common).run(
        pool(models, tokenizer=str(tokenizer_dir))
    )

    # the same weights, config record and logits as the model built in memory
    assert not mapped.training
    expected, got = built.state_dict(), mapped.state_dict()
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    built_record = {k: v for k, v in built.config.moe_ct.items() if k != "params"}
    assert {k: v for k, v in mapped.config.moe_ct.items() if k != "params"} == built_record
    with torch.no_grad():
        logits = mapped(real_ids).logits
        assert torch.equal(logits, built(real_ids).logits)
        assert torch.equal(logits, reload(out)(real_ids).logits)

    # no copies: the experts and the router of a layer live in one file mapping
    block = moe_block(mapped.model.layers[1])
    experts = block.experts
    first = next(expert_triples(block))[0]  # expert 0's gate projection, a parameter view
    if hasattr(experts, "gate_up_proj"):
        assert experts.gate_up_proj.is_contiguous() and experts.down_proj.is_contiguous()
    storage = block.gate.weight.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == storage

    # changing a weight (training) leaves the file as written
    on_disk = read_tensors(out)
    with torch.no_grad():
        first.add_(1.0)
    assert all(torch.equal(t, on_disk[k]) for k, t in read_tensors(out).items())


def test_small_shards_keep_each_fused_expert_tensor_in_one_file(
    tmp_path, saved, real_ids, monkeypatch, tiny_model
):
    from fusion_bench_moect.io import streaming

    base = saved(tiny_model("llama", layers=3))
    built = OrthogonalMoECTMergingAlgorithm(num_experts=4, dtype="float32").run(
        pool({"_pretrained_": base})
    )
    monkeypatch.setattr(streaming, "DEFAULT_MAX_SHARD_BYTES", 150_000)
    out = tmp_path / "moe"
    mapped = OrthogonalMoECTMergingAlgorithm(
        num_experts=4, dtype="float32", save_checkpoint=str(out)
    ).run(pool({"_pretrained_": base}))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    gate, up, down = MixtralArchitecture.expert_proj_names
    for layer in range(3):
        for projs in ((gate, up), (down,)):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts."
            names = [f"{prefix}{j}.{p}.weight" for j in range(4) for p in projs]
            assert len({weight_map[name] for name in names}) == 1, names
    with torch.no_grad():
        assert torch.equal(mapped(real_ids).logits, built(real_ids).logits)
    experts = moe_block(mapped.model.layers[2]).experts
    for fused in (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)):
        if fused is not None:  # transformers 5: a view of the whole file's mapping, no copy
            assert fused.untyped_storage().nbytes() > fused.nbytes
