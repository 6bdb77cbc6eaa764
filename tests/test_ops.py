"""Pure math: routers, lerp fusion, neuron slices, Drop-Upcycling."""

import pytest
import torch

from fusion_bench_moect.ops.fusion import add_noise, drop_neurons, lerp_fuse
from fusion_bench_moect.ops.routers import (
    condition_number,
    expand_groups,
    orthogonal_rows,
    random_rows,
    scale_anchor_rows,
    seeded_generator,
)


@pytest.mark.parametrize("rows, hidden", [(1, 8), (6, 36), (7, 576), (64, 64), (128, 576)])
def test_orthogonal_rows_are_orthonormal_in_float32(rows, hidden):
    r = orthogonal_rows(rows, hidden, seeded_generator(0, 1))
    assert r.dtype == torch.float32 and r.shape == (rows, hidden)
    assert torch.allclose(r @ r.T, torch.eye(rows), atol=1e-5)
    assert condition_number(r) == pytest.approx(1.0, abs=1e-5)


def test_orthogonal_rows_keep_condition_number_in_bfloat16():
    for layer in range(30):
        r = orthogonal_rows(8, 576, seeded_generator(42, 1, layer)).to(torch.bfloat16)
        assert condition_number(r) < 1.05


def test_orthogonal_rows_refuse_more_rows_than_hidden_size():
    with pytest.raises(ValueError, match="at most hidden_size=8 distinct router rows, got 9"):
        orthogonal_rows(9, 8, seeded_generator(0))


def test_random_streams_are_deterministic_and_independent():
    a = random_rows("random", 4, 16, seeded_generator(7, 1, 0))
    b = random_rows("random", 4, 16, seeded_generator(7, 1, 0))
    c = random_rows("random", 4, 16, seeded_generator(7, 1, 1))
    d = random_rows("random", 4, 16, seeded_generator(8, 1, 0))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_gate_mode_distributions():
    hidden = 400
    uniform = random_rows("uniform_random", 50, hidden, seeded_generator(1))
    bound = hidden**-0.5
    assert uniform.abs().max() <= bound and uniform.min() < -0.9 * bound
    normal = random_rows("random", 50, hidden, seeded_generator(1))
    assert normal.std().item() == pytest.approx(1.0, abs=0.02)
    assert normal.mean().item() == pytest.approx(0.0, abs=0.02)


def test_anchor_scaling_touches_only_anchor_rows():
    r = orthogonal_rows(4, 16, seeded_generator(0))
    scaled = scale_anchor_rows(r, [0, 2], 1.1)
    assert torch.equal(scaled[[1, 3]], r[[1, 3]])
    assert torch.allclose(scaled[[0, 2]], r[[0, 2]] * 1.1)
    x = torch.randn(5, 16)
    logits, new = x @ r.T, x @ scaled.T
    assert torch.allclose(new[:, 0], logits[:, 0] * 1.1, atol=1e-6)
    assert scale_anchor_rows(r, [], 1.1) is r


def test_expand_groups_repeats_each_row_g_times():
    r = torch.arange(6.0).view(3, 2)
    e = expand_groups(r, 2)
    assert e.shape == (6, 2)
    assert torch.equal(e[0], e[1]) and torch.equal(e[4], r[2])


def test_lerp_is_float32_and_bf16_within_one_rounding_step():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    src = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    for alpha in (0.0, 0.3, 0.8, 1.0):
        fused = lerp_fuse(base, src, alpha)
        assert fused.dtype == torch.float32
        reference = (1 - alpha) * base.double() + alpha * src.double()
        assert torch.allclose(fused.double(), reference, atol=1e-6)
        out = fused.to(torch.bfloat16).double()
        # at most one bf16 rounding step: half an ulp of the float32 reference (8 significant bits)
        ref32 = fused.double()
        ulp = torch.exp2(torch.floor(torch.log2(ref32.abs().clamp_min(1e-30))) - 7)
        assert bool(((out - ref32).abs() <= ulp / 2).all())
    assert torch.equal(lerp_fuse(base, src, 0.0), base.float())
    assert torch.equal(lerp_fuse(base, src, 1.0), src.float())


def test_lerp_alpha_zero_returns_a_fresh_copy():
    base = torch.randn(4, 4)
    out = lerp_fuse(base, base, 0.0)
    out.add_(1.0)
    assert not torch.equal(out, base)


def test_drop_neurons_redraws_the_same_neurons_in_gate_up_and_down():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(20, 8), torch.randn(20, 8), torch.randn(8, 20)
    g0, u0, d0 = gate.clone(), up.clone(), down.clone()
    drop_neurons(gate, up, down, 0.25, torch.Generator().manual_seed(3))
    changed_g = (gate != g0).any(1).nonzero().flatten().tolist()
    changed_u = (up != u0).any(1).nonzero().flatten().tolist()
    changed_d = (down != d0).any(0).nonzero().flatten().tolist()
    assert len(changed_g) == 5 and changed_g == changed_u == changed_d
    g1, u1, d1 = gate.clone(), up.clone(), down.clone()
    drop_neurons(gate, up, down, 0.0, gen)  # r = 0 is a no-op
    assert torch.equal(gate, g1) and torch.equal(up, u1) and torch.equal(down, d1)


def test_drop_neurons_follow_the_replaced_tensor_statistics():
    gate = torch.randn(4000, 16) * 3 + 2
    up, down = torch.randn(4000, 16), torch.randn(16, 4000)
    before = gate.clone()
    drop_neurons(gate, up, down, 0.5, torch.Generator().manual_seed(1))
    fresh = gate[(gate != before).any(1)]
    assert fresh.mean().item() == pytest.approx(before.mean().item(), abs=0.1)
    assert fresh.std().item() == pytest.approx(before.std().item(), rel=0.05)


def test_add_noise_scale():
    t = torch.zeros(1000, 100)
    add_noise(t, 0.01, torch.Generator().manual_seed(0))
    assert t.std().item() == pytest.approx(0.01, rel=0.02)
    z = torch.zeros(3)
    add_noise(z, 0.0, torch.Generator())
    assert not z.any()
