"""Routers in built models: orthogonality, anchors, prompt gates at the router's real input,
and the absence of FusionBench's own Mixtral defects."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed, pool
from transformers import AutoTokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.inspection import anchor_experts, moe_block
from fusion_bench_moect.ops.routers import condition_number

# Version-sensitive (routers and hidden-state hooks in this major's MoE blocks): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


def routers(moe):
    return [moe_block(layer).gate.weight.detach() for layer in moe.model.layers]


def test_orthogonal_routers_per_layer_distinct_and_recorded(saved, tiny_model):
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=8, dtype="float32", seed=3).run(
        pool({"_pretrained_": saved(tiny_model("llama", layers=3))})
    )
    rs = routers(moe)
    for r in rs:
        assert torch.allclose(r @ r.T, torch.eye(8), atol=1e-5)
    assert not torch.allclose(rs[0], rs[1])
    assert moe.config.moe_ct["router_condition_numbers"] == pytest.approx([1.0] * 3, abs=1e-5)


def test_bfloat16_routers_keep_condition_number_below_1_05(saved, tiny_model):
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=8, dtype="bfloat16").run(
        pool({"_pretrained_": saved(tiny_model("llama"))})
    )
    for r in routers(moe):
        assert r.dtype == torch.bfloat16
        assert condition_number(r) < 1.05


def test_seed_makes_builds_reproducible(saved, tiny_model):
    path = saved(tiny_model("llama"))
    a = routers(
        OrthogonalMoECTMergingAlgorithm(num_experts=4, seed=1).run(pool({"_pretrained_": path}))
    )
    b = routers(
        OrthogonalMoECTMergingAlgorithm(num_experts=4, seed=1).run(pool({"_pretrained_": path}))
    )
    c = routers(
        OrthogonalMoECTMergingAlgorithm(num_experts=4, seed=2).run(pool({"_pretrained_": path}))
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_router_aux_scale_multiplies_only_the_anchor_rows(saved, tiny_model):
    dense = tiny_model("llama")
    models = {
        "_pretrained_": saved(dense),
        "de": saved(perturbed(dense, 1)),
        "fr": saved(perturbed(dense, 2)),
    }
    plain = OrthogonalMoECTMergingAlgorithm(router_aux_scale=1.0, dtype="float32").run(pool(models))
    scaled = OrthogonalMoECTMergingAlgorithm(router_aux_scale=1.1, dtype="float32").run(
        pool(models)
    )
    assert anchor_experts(scaled) == [0]
    for p, s in zip(routers(plain), routers(scaled), strict=True):
        assert torch.allclose(s[0], p[0] * 1.1)
        assert torch.equal(s[1:], p[1:])
    named = OrthogonalMoECTMergingAlgorithm(
        router_aux_scale=1.25, anchor_experts=["fr"], dtype="float32"
    ).run(pool(models))
    assert anchor_experts(named) == [2]
    for p, s in zip(routers(plain), routers(named), strict=True):
        assert torch.allclose(s[2], p[2] * 1.25) and torch.equal(s[:2], p[:2])


def test_router_aux_scale_without_anchor_warns_and_leaves_routers(saved, caplog, tiny_model):
    path = saved(tiny_model("llama"))
    plain = OrthogonalMoECTMergingAlgorithm(num_experts=4, router_aux_scale=1.0).run(
        pool({"_pretrained_": path})
    )
    with caplog.at_level("WARNING"):
        scaled = OrthogonalMoECTMergingAlgorithm(num_experts=4, router_aux_scale=1.1).run(
            pool({"_pretrained_": path})
        )
    assert caplog.text.count("router_aux_scale=1.1 has no effect") == 1
    assert all(torch.equal(x, y) for x, y in zip(routers(plain), routers(scaled), strict=True))


def test_gate_scale_and_fine_grained_groups_share_rows(saved, tiny_model):
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=8, granularity=4, experts_per_token=4, gate_scale=2.0, dtype="float32"
    ).run(pool({"_pretrained_": saved(tiny_model("llama"))}))
    r = routers(moe)[0]
    assert torch.equal(r[0], r[3]) and torch.equal(r[4], r[7])
    groups = r[::4]
    assert torch.allclose(groups @ groups.T, 4 * torch.eye(2), atol=1e-5)


def test_hidden_gates_read_the_post_attention_norm_output(
    tmp_path, saved, tiny_model, tokenizer_dir
):
    dense = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = {
        "expert_0": ["This License applies to any program or other work."],
        "expert_1": {
            "positive": ["You may convey verbatim copies of the Program's source code."],
            "negative": ["Everyone is permitted to copy and distribute."],
        },
    }
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, gate_mode="hidden", prompts=prompts, dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}, tokenizer=str(tokenizer_dir)))
    # Independent reference: capture what each MoE block of the built model receives.
    captured = {}
    hooks = [
        moe_block(layer).register_forward_pre_hook(
            lambda _m, args, i=i: captured.setdefault(i, []).append(args[0][0])
        )
        for i, layer in enumerate(moe.model.layers)
    ]

    def mean_input(texts):
        captured.clear()
        with torch.no_grad():
            for text in texts:
                moe(tok(text, return_tensors="pt").input_ids)
        return [torch.cat(captured[i]).double().mean(0) for i in range(len(moe.model.layers))]

    pos0 = mean_input(prompts["expert_0"])
    pos1 = mean_input(prompts["expert_1"]["positive"])
    neg1 = mean_input(prompts["expert_1"]["negative"])
    for h in hooks:
        h.remove()
    for layer, r in enumerate(routers(moe)):
        want0 = pos0[layer] / pos0[layer].norm()
        diff1 = pos1[layer] - neg1[layer]
        want1 = diff1 / diff1.norm()
        assert torch.allclose(r[0].double(), want0, atol=1e-5)
        assert torch.allclose(r[1].double(), want1, atol=1e-5)


def test_cheap_embed_gates_are_normalised_mean_embeddings(
    tmp_path, saved, tiny_model, tokenizer_dir
):
    dense = tiny_model("llama", layers=2)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = {"expert_0": ["free software"], "expert_1": ["copyleft license"]}
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, gate_mode="cheap_embed", prompts=prompts, dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}, tokenizer=str(tokenizer_dir)))
    emb = dense.model.embed_tokens.weight.detach().double()
    for j, name in enumerate(["expert_0", "expert_1"]):
        mean = emb[tok(prompts[name][0], return_tensors="pt").input_ids[0]].mean(0)
        want = mean / mean.norm()
        for r in routers(moe):
            assert torch.allclose(r[j].double(), want, atol=1e-6)


def test_parent_defects_are_absent(saved, real_ids, tiny_model):
    """FusionBench 0.2.33's Mixtral merging: no attention copy, NaN routers, float32 always,
    a no-op num_experts. Ours copies everything, initialises routers, honours both."""
    from fusion_bench.method import MixtralForCausalLMMergingAlgorithm

    dense = tiny_model("llama")  # saved in float32
    algo = OrthogonalMoECTMergingAlgorithm(num_experts=5, experts_per_token=2)
    assert isinstance(algo, MixtralForCausalLMMergingAlgorithm)
    moe = algo.run(pool({"_pretrained_": saved(dense)}, model_kwargs={"dtype": "bfloat16"}))
    assert moe.config.num_local_experts == 5 and len(routers(moe)[0]) == 5
    assert moe.dtype == torch.bfloat16
    for name, param in moe.named_parameters():
        assert torch.isfinite(param.float()).all(), name
    for dl, ml in zip(dense.model.layers, moe.model.layers, strict=True):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want = getattr(dl.self_attn, proj).weight.to(torch.bfloat16)
            assert torch.equal(getattr(ml.self_attn, proj).weight, want)
    assert not any(torch.isnan(r.float()).any() for r in routers(moe))
