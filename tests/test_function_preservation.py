"""Upcycled / alpha=0 MoE models reproduce the dense base exactly (docs/algorithm.md, "Why
the upcycled model equals the base")."""

from __future__ import annotations

import pytest
import torch
from helpers import max_diff, perturbed, pool

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

#: Version-sensitive (each family's MoE layout in this major's modelling code): these also run
#: under transformers 4.57; the gate mode does not touch the layout, so one suffices there.
cross_version = pytest.mark.cross_version
TOL = 1e-5


CASES = [
    # (base family, output architecture, num_experts, top-k, granularity)
    ("llama", "mixtral", 6, 2, 1),
    ("llama", "mixtral", 6, 4, 2),
    ("llama", "mixtral", 16, 8, 8),
    ("llama", "qwen2_moe", 5, 2, 1),
    ("llama", "qwen2_moe", 8, 2, 2),
    ("llama", "qwen2_moe", 16, 8, 8),
    ("mistral", "mixtral", 3, 1, 1),
    ("mistral", "qwen2_moe", 4, 2, 2),
    ("qwen2", "qwen2_moe", 6, 2, 1),
    ("qwen2", "qwen2_moe", 24, 16, 8),
    ("qwen3", "qwen3_moe", 6, 2, 1),
    ("qwen3", "qwen3_moe", 12, 4, 2),
    ("qwen3", "qwen3_moe", 16, 8, 8),
    ("qwen3", "auto", 128, 8, 8),  # the showcase: 16 groups x 8 fine-grained experts
    ("llama", "glm4_moe", 6, 2, 1),
    ("mistral", "glm4_moe", 8, 4, 2),
    ("qwen2", "glm4_moe", 6, 2, 1),
    ("qwen3", "glm4_moe", 16, 8, 8),
]


@pytest.mark.parametrize("family, arch, experts, k, g", CASES)
@pytest.mark.parametrize(
    "gate_mode", [pytest.param("orthogonal", marks=cross_version), "random", "uniform_random"]
)
def test_pure_upcycling_reproduces_the_base(
    saved, real_ids, family, arch, experts, k, g, gate_mode, tiny_model
):
    dense = tiny_model(family)
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=experts,
        experts_per_token=k,
        granularity=g,
        gate_mode=gate_mode,
        architecture=arch,
        dtype="float32",
    )
    moe = algo.run(pool({"_pretrained_": saved(dense)}))
    assert moe.config.model_type == ("qwen3_moe" if arch == "auto" else arch)
    assert moe.config.moe_ct["granularity"] == g
    assert len(moe.config.moe_ct["experts"]) == experts
    assert max_diff(moe, dense, real_ids) < TOL


@cross_version
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_one_and_two_layer_models_tied_and_untied(saved, real_ids, layers, tie, tiny_model):
    dense = tiny_model("llama", layers=layers, tie_word_embeddings=tie)
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=3, dtype="float32").run(
        pool({"_pretrained_": saved(dense)})
    )
    assert moe.config.tie_word_embeddings == tie
    if tie:
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    assert max_diff(moe, dense, real_ids) < TOL


@cross_version
@pytest.mark.parametrize(
    "family, arch, g, k",
    [("llama", "mixtral", 1, 2), ("qwen2", "qwen2_moe", 2, 4), ("qwen3", "qwen3_moe", 2, 2)],
)
def test_moe_ct_with_alpha_zero_reproduces_the_base(
    saved, real_ids, family, arch, g, k, tiny_model
):
    dense = tiny_model(family)
    ft_a, ft_b = perturbed(dense, 1), perturbed(dense, 2)
    models = {"_pretrained_": saved(dense), "de": saved(ft_a), "fr": saved(ft_b)}
    algo = OrthogonalMoECTMergingAlgorithm(
        base_alpha=0.0,
        alpha_strategy="constant",
        granularity=g,
        experts_per_token=k,
        dtype="float32",
    )
    moe = algo.run(pool(models))
    assert moe.config.moe_ct["expert_sources"] == ["_pretrained_", "de", "fr"]
    assert moe.config.moe_ct["alphas"] == [0.0, 0.0]
    assert max_diff(moe, dense, real_ids) < TOL
    # the same with an explicit per-layer list and no base expert
    algo = OrthogonalMoECTMergingAlgorithm(
        alpha_strategy=[0.0, 0.0],
        include_base_expert=False,
        granularity=g,
        experts_per_token=k,
        dtype="float32",
    )
    assert max_diff(algo.run(pool(models)), dense, real_ids) < TOL


@cross_version
def test_qwen2_base_with_zero_biases_fits_mixtral(saved, real_ids, tiny_model):
    dense = tiny_model("qwen2")
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=4, architecture="mixtral", dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}))
    assert moe.config.model_type == "mixtral"
    assert max_diff(moe, dense, real_ids) < TOL


@cross_version
def test_qwen2_moe_from_llama_fills_zero_attention_biases(saved, tiny_model):
    dense = tiny_model("llama")
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, architecture="qwen2_moe", dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}))
    attn = moe.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and not attn.q_proj.bias.any()
    mlp = moe.model.layers[0].mlp
    # sigmoid(gate) = 1/2: a tiny nonzero gate (llama.cpp computes sigmoid as silu(x) / x)
    assert (mlp.shared_expert_gate.weight.abs() < 1e-20).all()
    assert moe.config.norm_topk_prob is True
    base_down = dense.model.layers[0].mlp.down_proj.weight
    assert torch.allclose(mlp.shared_expert.down_proj.weight, base_down)  # 2 * w = 1 at w = 1/2


@cross_version
def test_shared_expert_share_moves_output_between_shared_and_routed(saved, real_ids, tiny_model):
    dense = tiny_model("llama")
    path = saved(dense)
    for share in (0.25, 1.0):
        moe = OrthogonalMoECTMergingAlgorithm(
            num_experts=2, architecture="qwen2_moe", shared_expert_share=share, dtype="float32"
        ).run(pool({"_pretrained_": path}))
        mlp = moe.model.layers[0].mlp
        base_down = dense.model.layers[0].mlp.down_proj.weight
        assert torch.allclose(mlp.shared_expert.down_proj.weight, base_down * 2 * share)
        assert max_diff(moe, dense, real_ids) < TOL


@cross_version
def test_k_not_a_multiple_of_g_warns(saved, caplog, tiny_model):
    dense = tiny_model("llama")
    with caplog.at_level("WARNING"):
        OrthogonalMoECTMergingAlgorithm(num_experts=4, granularity=2, experts_per_token=3).run(
            pool({"_pretrained_": saved(dense)})
        )
    assert "not a multiple of granularity 2" in caplog.text


@cross_version
def test_bfloat16_output_stays_close_to_the_bfloat16_base(saved, real_ids, tiny_model):
    dense = tiny_model("llama").to(torch.bfloat16)
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=8).run(pool({"_pretrained_": saved(dense)}))
    assert moe.dtype == torch.bfloat16
    assert max_diff(moe, dense, real_ids) < 0.05


@cross_version
def test_in_memory_models_work_like_directories(real_ids, tiny_model):
    """A dense model object (or a pool of model objects) is read through the pool."""
    from fusion_bench.modelpool import BaseModelPool

    dense = tiny_model("mistral", tie_word_embeddings=False)
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=3, dtype="float32").run(dense)
    assert max_diff(moe, dense, real_ids) < TOL
    merged = OrthogonalMoECTMergingAlgorithm(alpha_strategy=[0.0, 0.0], dtype="float32").run(
        BaseModelPool({"_pretrained_": dense, "ft": perturbed(dense, 3)})
    )
    assert merged.config.moe_ct["experts"] == ["_pretrained_", "ft"]
    assert max_diff(merged, dense, real_ids) < TOL
