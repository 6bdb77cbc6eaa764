"""A shared expert from several FFNs. Pure math, no I/O.

n FFNs (gate_k, up_k, down_k) of width I become one FFN of width n x I: the gate and up rows
are concatenated, and so are the down columns, each block scaled by its factor c_k, so that

    shared(x) = sum_k c_k * down_k(act(gate_k x) * up_k x)

exactly (an FFN is a sum over its neurons; concatenation only adds neurons).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shared_expert_scales(
    shared_expert_share: float, residual_scales: Sequence[float], gate_factor: float
) -> list[float]:
    """The factor c_k of each FFN's down projection in the shared expert.

    The shared expert's output is to be the share w of the layer output, the n FFNs
    contributing equally, whatever its gate passes at first (1/2 for a sigmoid gate at 0, all
    without a gate): c_k = gate_factor w / n with gate_factor = 1 / that value, times the FFN's
    ``residual_scale`` r_k (mergekit-moe's down-projection factor).
    """
    n = len(residual_scales)
    if n == 0:
        raise ValueError("A shared expert needs at least one FFN.")
    return [gate_factor * shared_expert_share * r / n for r in residual_scales]


def concat_ffns(
    ffns: Sequence[Sequence[torch.Tensor]], scales: Sequence[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FFN from several: (gate (nI, H), up (nI, H), down (H, nI)) in ``dtype``.

    Args:
        ffns: Per FFN (gate (I, H), up (I, H), down (H, I)), any float dtype.
        scales: The factor of each FFN's down projection (see ``shared_expert_scales``).
        dtype: Output dtype; scaled down projections are computed in float32, cast once.
    """
    if len(ffns) != len(scales):
        raise ValueError(f"{len(ffns)} FFNs but {len(scales)} scales.")
    gate = torch.cat([f[0].to(dtype) for f in ffns], dim=0)
    up = torch.cat([f[1].to(dtype) for f in ffns], dim=0)
    downs = [
        f[2].to(dtype) if s == 1.0 else (f[2].to(torch.float32) * s).to(dtype)
        for f, s in zip(ffns, scales, strict=True)
    ]
    return gate, up, torch.cat(downs, dim=1)
