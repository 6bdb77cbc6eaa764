"""Expert weights in built models: MoE-CT lerp, Drop-Upcycling, noise, residual scale, slices."""

from __future__ import annotations

import pytest
import torch
from helpers import expert_stacks, max_diff, perturbed, pool

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

# Version-sensitive (expert weights in this major's layout (ModuleList or fused 3-D)): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


def test_moe_ct_experts_are_float32_lerps_of_base_and_source(saved, tiny_model):
    dense = tiny_model("llama", layers=3)
    ft = perturbed(dense, 1).to(torch.bfloat16)  # Module.to is in place
    dense = dense.to(torch.bfloat16)
    moe = OrthogonalMoECTMergingAlgorithm(alpha_strategy="u_shaped", base_alpha=0.8).run(
        pool({"_pretrained_": saved(dense), "ft": saved(ft)})
    )
    assert moe.config.moe_ct["alphas"] == pytest.approx([0.8, 0.0, 0.8])
    for layer, alpha in enumerate(moe.config.moe_ct["alphas"]):
        gate, up, down = expert_stacks(moe, layer)
        base_mlp, ft_mlp = dense.model.layers[layer].mlp, ft.model.layers[layer].mlp
        for stack, name in ((gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")):
            b = getattr(base_mlp, name).weight
            s = getattr(ft_mlp, name).weight
            want = torch.lerp(b.float(), s.float(), alpha).to(torch.bfloat16)
            assert torch.equal(stack[0], b)  # expert 0: the base anchor, untouched
            assert torch.equal(stack[1], want)


def test_plain_merging_uses_the_sources_unchanged(saved, tiny_model):
    dense = tiny_model("llama")
    ft = perturbed(dense, 1)
    moe = OrthogonalMoECTMergingAlgorithm(
        moe_ct_mode=False, include_base_expert=False, experts_per_token=1, dtype="float32"
    ).run(pool({"_pretrained_": saved(dense), "ft": saved(ft)}))
    assert moe.config.moe_ct["alphas"] == [1.0, 1.0]
    gate, _, down = expert_stacks(moe, 1)
    assert torch.equal(gate[0], ft.model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(down[0], ft.model.layers[1].mlp.down_proj.weight)


def test_drop_ratio_zero_is_bit_identical_and_positive_redraws_shared_neurons(saved, tiny_model):
    path = saved(tiny_model("llama"))
    plain = OrthogonalMoECTMergingAlgorithm(num_experts=4, dtype="float32").run(
        pool({"_pretrained_": path})
    )
    zero = OrthogonalMoECTMergingAlgorithm(num_experts=4, drop_ratio=0.0, dtype="float32").run(
        pool({"_pretrained_": path})
    )
    for a, b in zip(plain.state_dict().values(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    dropped = OrthogonalMoECTMergingAlgorithm(num_experts=4, drop_ratio=0.5, dtype="float32").run(
        pool({"_pretrained_": path})
    )
    g0, u0, d0 = expert_stacks(plain, 0)
    g1, u1, d1 = expert_stacks(dropped, 0)
    sets = []
    for e in range(4):
        rows_g = (g1[e] != g0[e]).any(1).nonzero().flatten().tolist()
        rows_u = (u1[e] != u0[e]).any(1).nonzero().flatten().tolist()
        cols_d = (d1[e] != d0[e]).any(0).nonzero().flatten().tolist()
        assert len(rows_g) == 32 and rows_g == rows_u == cols_d  # half of 64 neurons
        sets.append(tuple(rows_g))
    assert len(set(sets)) == 4  # each expert draws its own neurons
    # routers and attention are untouched by dropping
    assert torch.equal(
        plain.model.layers[0].self_attn.q_proj.weight,
        dropped.model.layers[0].self_attn.q_proj.weight,
    )


def test_drop_spares_the_anchor_expert(saved, tiny_model):
    dense = tiny_model("llama")
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    moe = OrthogonalMoECTMergingAlgorithm(drop_ratio=0.25, dtype="float32").run(pool(models))
    gate, _, _ = expert_stacks(moe, 0)
    assert torch.equal(gate[0], dense.model.layers[0].mlp.gate_proj.weight)


def test_noise_and_residual_scale_per_expert(saved, tiny_model):
    dense = tiny_model("llama")
    path = saved(dense)
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=3,
        noise_scale={"expert_1": 0.01},
        residual_scale={"expert_2": 0.5},
        dtype="float32",
    ).run(pool({"_pretrained_": path}))
    gate, _, down = expert_stacks(moe, 0)
    base = dense.model.layers[0].mlp
    assert torch.equal(gate[0], base.gate_proj.weight) and torch.equal(
        down[0], base.down_proj.weight
    )
    noise = gate[1] - base.gate_proj.weight
    assert 0.008 < noise.std().item() < 0.012
    assert torch.allclose(down[2], base.down_proj.weight * 0.5)
    assert torch.equal(gate[2], base.gate_proj.weight)


@pytest.mark.parametrize("permute", [False, True])
def test_fine_grained_slices_partition_the_ffn(saved, real_ids, permute, tiny_model):
    dense = tiny_model("llama")
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=8, granularity=4, experts_per_token=4, permute_neurons=permute, dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}))
    gate, up, down = expert_stacks(moe, 0)
    assert gate.shape == (8, 16, 72) and down.shape == (8, 72, 16)
    base_gate = dense.model.layers[0].mlp.gate_proj.weight
    # the 4 slices of group 0 hold every neuron of the base FFN exactly once
    rows = torch.cat([gate[j] for j in range(4)])
    assert torch.equal(rows.sort(0).values, base_gate.sort(0).values)
    assert torch.equal(torch.cat([gate[j] for j in range(4)]), base_gate) != permute
    # down slices are scaled by G
    assert (
        torch.allclose(down[0] / 4, dense.model.layers[0].mlp.down_proj.weight[:, :16]) != permute
    )
    assert max_diff(moe, dense, real_ids) < 1e-5
