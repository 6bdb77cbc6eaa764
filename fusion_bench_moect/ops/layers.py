"""Which decoder layers become MoE (``moe_layers``). Pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

#: ``moe_layers`` value that keeps every layer whose alpha is 0 dense.
AUTO_FROM_ALPHA = "auto_from_alpha"
#: An alpha at most this is 0 (the u-shaped schedule's middle layer is 0 up to rounding).
ALPHA_ZERO = 1e-12


def resolve_moe_layers(spec: str | Sequence[int] | None, alphas: Sequence[float]) -> list[int]:
    """The sorted decoder-layer indices that become MoE; the others keep the base FFN.

    Args:
        spec: None (every layer), a list of layer indices, or ``auto_from_alpha`` (every
            layer whose alpha is not 0: at alpha 0 every expert equals the base FFN, so the
            layer needs no experts).
        alphas: The per-layer alpha schedule (its length is the number of layers).

    Raises:
        ValueError: For an unknown string, an index out of range or repeated, a non-integer,
            or a selection that leaves no MoE layer.
    """
    num_layers = len(alphas)
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, str):
        if spec != AUTO_FROM_ALPHA:
            raise ValueError(
                f"Unknown moe_layers {spec!r}; give a list of layer indices or '{AUTO_FROM_ALPHA}'."
            )
        layers = [i for i, a in enumerate(alphas) if a > ALPHA_ZERO]
        if not layers:
            raise ValueError(
                "moe_layers: auto_from_alpha keeps every layer dense (every alpha is 0); raise "
                "base_alpha or choose another alpha_strategy."
            )
        return layers
    layers = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_layers:
            raise ValueError(
                f"moe_layers entry {item!r} is not a layer index in [0, {num_layers - 1}] "
                f"(the base model has {num_layers} layers)."
            )
        if item in layers:
            raise ValueError(f"moe_layers lists layer {item} twice.")
        layers.append(item)
    if not layers:
        raise ValueError(
            "moe_layers is empty: no layer would become MoE; list at least one layer index "
            "(or leave moe_layers unset for every layer)."
        )
    return sorted(layers)


def dense_layers(moe_layers: Sequence[int], num_layers: int) -> list[int]:
    """The layers outside ``moe_layers`` (transformers' ``mlp_only_layers``)."""
    chosen = set(moe_layers)
    return [i for i in range(num_layers) if i not in chosen]
