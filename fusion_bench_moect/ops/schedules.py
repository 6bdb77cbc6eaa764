"""Layer-wise alpha schedules for MoE-CT fusion (docs/algorithm.md, "What is built")."""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA_STRATEGIES = ("constant", "linear_increase", "linear_decrease", "u_shaped")


def layer_depths(num_layers: int) -> list[float]:
    """Normalised depth d_l = l / (L - 1) of every layer; 0 for a single layer.

    Args:
        num_layers: Number of decoder layers L (>= 1).

    Returns:
        A list of L depths in [0, 1].
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return [0.0]
    return [layer / (num_layers - 1) for layer in range(num_layers)]


def alpha_schedule(
    strategy: str | Sequence[float], base_alpha: float, num_layers: int
) -> list[float]:
    """Per-layer fusion weights alpha_l.

    Args:
        strategy: One of ``ALPHA_STRATEGIES`` or an explicit list of ``num_layers`` values.
        base_alpha: Peak alpha in [0, 1]; ignored for an explicit list.
        num_layers: Number of decoder layers L.

    Returns:
        A list of L floats in [0, 1].

    Raises:
        ValueError: For an out-of-range ``base_alpha``, an unknown strategy, or a list of
            the wrong length or with values outside [0, 1].
    """
    if not isinstance(strategy, str):
        values = [float(v) for v in strategy]
        if len(values) != num_layers:
            raise ValueError(
                f"alpha_strategy is a list of {len(values)} values but the base model has "
                f"{num_layers} layers; give exactly one alpha per layer."
            )
        bad = [(i, v) for i, v in enumerate(values) if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(
                f"alpha_strategy list values must lie in [0, 1]; layer {bad[0][0]} has {bad[0][1]}."
            )
        return values
    if not 0.0 <= float(base_alpha) <= 1.0:
        raise ValueError(f"base_alpha must lie in [0, 1], got {base_alpha}.")
    depths = layer_depths(num_layers)
    if strategy == "constant":
        return [float(base_alpha)] * num_layers
    if strategy == "linear_increase":
        return [base_alpha * d for d in depths]
    if strategy == "linear_decrease":
        return [base_alpha * (1.0 - d) for d in depths]
    if strategy == "u_shaped":
        return [base_alpha * 0.5 * (1.0 + math.cos(2.0 * math.pi * d)) for d in depths]
    raise ValueError(
        f"Unknown alpha_strategy {strategy!r}; valid: {', '.join(ALPHA_STRATEGIES)} "
        "or a list of one alpha per layer."
    )
