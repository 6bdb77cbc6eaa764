"""Routing-balance metrics against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_bench_moect.eval.routing import (
    RoutingAccumulator,
    anchor_share,
    coefficient_of_variation,
    dead_experts,
    distinct_row_condition,
    gini,
    layer_balance,
    load_entropy,
    load_shares,
    max_violation,
    router_entropy_sum,
    selection_counts,
    summarize_layers,
)

# Four experts with loads 3, 1, 0, 4: mean 2, population variance (1 + 1 + 4 + 4) / 4 = 2.5.
COUNTS = [3, 1, 0, 4]


def test_shares_cv_maxvio_by_hand():
    assert load_shares(COUNTS) == [0.375, 0.125, 0.0, 0.5]
    assert coefficient_of_variation(COUNTS) == pytest.approx(math.sqrt(2.5) / 2)  # 0.790569
    assert max_violation(COUNTS) == pytest.approx(4 / 2 - 1)
    assert max_violation([5, 5, 5, 5]) == 0.0
    assert coefficient_of_variation([5, 5, 5, 5]) == 0.0
    assert max_violation([8, 0, 0, 0]) == pytest.approx(3.0)  # E - 1 when one expert takes all


def test_load_entropy_and_gini_by_hand():
    expected = -(0.375 * math.log(0.375) + 0.125 * math.log(0.125) + 0.5 * math.log(0.5))
    assert load_entropy(COUNTS) == pytest.approx(expected / math.log(4))  # 0.702821
    assert load_entropy([7, 7, 7, 7]) == pytest.approx(1.0)
    assert load_entropy([9, 0, 0, 0]) == pytest.approx(0.0)
    assert load_entropy([4]) == 1.0
    # Sum of |c_i - c_j| over ordered pairs = 28; 28 / (2 * 4^2 * 2) = 0.4375.
    assert gini(COUNTS) == pytest.approx(0.4375)
    assert gini([2, 2, 2, 2]) == 0.0
    assert gini([8, 0, 0, 0]) == pytest.approx(3 / 4)


def test_dead_and_anchor_share():
    # Balanced share 1/4; threshold 0.1 -> dead below 0.025 of the slots.
    assert dead_experts(COUNTS, 0.1) == [2]
    assert dead_experts([100, 2, 98, 100], 0.1) == [1]  # 2/300 = 0.0067 < 0.025
    assert dead_experts([100, 2, 98, 100], 0.0) == []
    assert dead_experts([100, 0, 98, 100], 0.0) == [1]
    assert anchor_share(COUNTS, [3]) == pytest.approx(0.5)
    assert anchor_share(COUNTS, [0, 1]) == pytest.approx(0.5)
    assert anchor_share(COUNTS, []) is None
    with pytest.raises(ValueError, match="out of range"):
        anchor_share(COUNTS, [4])


def test_empty_counts_give_none():
    zeros = [0, 0, 0]
    assert load_shares(zeros) == [0.0, 0.0, 0.0]
    assert coefficient_of_variation(zeros) is None
    assert max_violation(zeros) is None
    assert load_entropy(zeros) is None
    assert gini(zeros) is None
    assert dead_experts(zeros) == []


def test_selection_counts_topk_of_softmax_and_padding_mask():
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0, -1.0],  # top-2 {0, 1}
            [0.0, 0.5, 3.0, 1.0],  # {2, 3}
            [5.0, 4.0, 0.0, 0.0],  # padding: ignored
            [1.0, 0.0, 0.0, 2.0],  # {3, 0}
        ]
    )
    mask = torch.tensor([1, 1, 0, 1])
    assert selection_counts(logits, 2, mask).tolist() == [2, 1, 1, 2]
    assert selection_counts(logits, 2).tolist() == [3, 2, 1, 2]
    assert selection_counts(logits, 1, mask).tolist() == [1, 0, 1, 1]
    # (batch, time) masks flatten in the same order as the (batch * time, E) logits.
    assert selection_counts(logits, 2, mask.view(2, 2)).tolist() == [2, 1, 1, 2]
    with pytest.raises(ValueError, match="top_k"):
        selection_counts(logits, 5)
    with pytest.raises(ValueError, match="mask has 3 entries"):
        selection_counts(logits, 2, torch.ones(3))


def test_router_entropy():
    uniform = torch.zeros(5, 4)
    assert router_entropy_sum(uniform) == pytest.approx(5 * math.log(4))
    confident = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert router_entropy_sum(confident) == pytest.approx(0.0, abs=1e-12)
    # p = (0.5, 0.5, 0, 0) up to exp(-60): entropy ln 2.
    halves = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    assert router_entropy_sum(halves) == pytest.approx(math.log(2), rel=1e-6)
    assert router_entropy_sum(uniform, torch.tensor([1, 0, 0, 0, 1])) == pytest.approx(
        2 * math.log(4)
    )


def test_condition_number_on_distinct_rows():
    q, _ = torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    value, distinct = distinct_row_condition(q.T)
    assert distinct == 4 and value == pytest.approx(1.0, abs=1e-5)
    value, distinct = distinct_row_condition(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert (value, distinct) == (pytest.approx(2.0), 2)
    # Fine-grained experts repeat their group's row: duplicates do not make it singular.
    value, distinct = distinct_row_condition(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]))
    assert (value, distinct) == (pytest.approx(3.0), 2)
    assert distinct_row_condition(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))[0] is None
    value, _ = distinct_row_condition(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16))
    assert value == pytest.approx(2.0)


def test_layer_balance_and_summary():
    layer = layer_balance(COUNTS, entropy_sum=2 * math.log(4), num_tokens=4, anchors=[3])
    assert layer["shares"] == [0.375, 0.125, 0.0, 0.5]
    assert layer["router_entropy"] == pytest.approx(0.5)
    assert layer["dead_experts"] == [2] and layer["num_dead_experts"] == 1
    assert layer["anchor_share"] == pytest.approx(0.5)
    other = layer_balance([2, 2, 2, 2], entropy_sum=4 * math.log(4), num_tokens=4)
    other["condition_number"] = 3.0
    layer["condition_number"] = 1.0
    layer["layer"], other["layer"] = 0, 5
    summary = summarize_layers([layer, other])
    assert summary["num_layers"] == 2
    assert summary["mean_cv"] == pytest.approx(math.sqrt(2.5) / 2 / 2)
    assert summary["mean_max_violation"] == pytest.approx(0.5)
    assert summary["max_max_violation"] == pytest.approx(1.0)
    assert summary["mean_router_entropy"] == pytest.approx(0.75)
    assert summary["dead_experts"] == 1
    assert summary["layers_with_dead_experts"] == [0]
    assert summary["mean_anchor_share"] == pytest.approx(0.5)  # layers without anchors skipped
    assert summary["mean_condition_number"] == pytest.approx(2.0)
    assert summary["max_condition_number"] == pytest.approx(3.0)


def test_accumulator_over_batches_with_padding():
    acc = RoutingAccumulator(num_layers=2, num_experts=3, top_k=1)
    layer0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 1.0]])
    layer1 = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    attention_mask = torch.tensor([[1, 1], [0, 1]])  # batch 2 x time 2, one padding token
    acc.update([layer0, layer1], attention_mask)
    acc.update([layer0[:1], layer1[:1]], torch.tensor([[1]]))
    assert acc.num_tokens == 4
    assert acc.counts.tolist() == [[2, 1, 1], [0, 0, 4]]
    reports = acc.layer_reports(anchors=[2])
    assert reports[1]["anchor_share"] == 1.0
    assert reports[1]["dead_experts"] == [0, 1]
    assert reports[0]["tokens"] == 4
    other = RoutingAccumulator(2, 3, 1)
    other.update([layer0, layer1])
    acc.merge(other)
    assert acc.num_tokens == 8
    assert acc.counts.tolist() == [[3, 2, 3], [0, 0, 8]]
    with pytest.raises(ValueError, match="2 MoE layers"):
        acc.update([layer0])
