import math

import pytest

from fusion_bench_moect.ops.schedules import alpha_schedule, layer_depths


@pytest.mark.parametrize("num_layers", [1, 2, 30, 32])
def test_depths_match_spec(num_layers):
    depths = layer_depths(num_layers)
    assert len(depths) == num_layers
    if num_layers == 1:
        assert depths == [0.0]
    else:
        assert depths[0] == 0.0 and depths[-1] == 1.0
        assert depths[1] == pytest.approx(1 / (num_layers - 1), abs=0)


@pytest.mark.parametrize("num_layers", [1, 2, 30, 32])
@pytest.mark.parametrize("base_alpha", [0.0, 0.5, 0.8, 1.0])
def test_every_strategy_follows_its_formula(num_layers, base_alpha):
    d = [0.0] if num_layers == 1 else [i / (num_layers - 1) for i in range(num_layers)]
    expected = {
        "constant": [base_alpha] * num_layers,
        "linear_increase": [base_alpha * x for x in d],
        "linear_decrease": [base_alpha * (1 - x) for x in d],
        "u_shaped": [base_alpha * 0.5 * (1 + math.cos(2 * math.pi * x)) for x in d],
    }
    for strategy, values in expected.items():
        assert alpha_schedule(strategy, base_alpha, num_layers) == pytest.approx(values, abs=1e-12)


def test_u_shaped_is_base_alpha_at_ends_and_zero_in_middle():
    alphas = alpha_schedule("u_shaped", 0.8, 31)
    assert alphas[0] == pytest.approx(0.8) and alphas[-1] == pytest.approx(0.8)
    assert alphas[15] == pytest.approx(0.0, abs=1e-12)
    assert min(alphas) == alphas[15]
    # 32 layers: no exact middle, the two central layers are the smallest and close to 0
    alphas32 = alpha_schedule("u_shaped", 0.8, 32)
    assert max(alphas32[15], alphas32[16]) < 0.01


def test_explicit_list_is_returned_as_is():
    assert alpha_schedule([0.1, 0.0, 1.0], 0.5, 3) == [0.1, 0.0, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (("constant", 1.5, 4), "base_alpha must lie in \\[0, 1\\]"),
        (("constant", -0.1, 4), "base_alpha must lie in \\[0, 1\\]"),
        (("zigzag", 0.5, 4), "Unknown alpha_strategy 'zigzag'; valid: constant, linear_increase"),
        (([0.1, 0.2], 0.5, 3), "list of 2 values but the base model has 3 layers"),
        (([0.1, 1.2, 0.3], 0.5, 3), "layer 1 has 1.2"),
    ],
)
def test_bad_schedules_name_the_culprit(args, message):
    with pytest.raises(ValueError, match=message):
        alpha_schedule(*args)
