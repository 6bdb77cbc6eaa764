"""Expert weight construction: MoE-CT lerp, noise, Drop-Upcycling. Pure math."""

from __future__ import annotations

import torch


def lerp_fuse(base: torch.Tensor, source: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * base + alpha * source`` computed in float32.

    The result stays float32 so the caller casts exactly once to the output dtype.
    """
    if alpha == 0.0:
        return base.to(torch.float32, copy=True)
    return torch.lerp(base.to(torch.float32), source.to(torch.float32), float(alpha))


def drop_neurons(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ratio: float,
    generator: torch.Generator,
) -> None:
    """Drop-Upcycling in place: re-draw a fraction ``ratio`` of the intermediate neurons.

    The same neuron set is used for gate/up rows and down columns; replacements follow a
    normal with the mean and std of the tensor being replaced.
    """
    if ratio <= 0.0:
        return
    num = gate.shape[0]
    count = int(round(ratio * num))
    if count == 0:
        return
    index = torch.randperm(num, generator=generator)[:count]
    for tensor, rows_view in ((gate, gate), (up, up), (down, down.T)):
        mean, std = float(tensor.mean()), float(tensor.std())
        fresh = torch.randn(count, rows_view.shape[1], generator=generator, dtype=tensor.dtype)
        rows_view[index] = fresh * std + mean


def add_noise(tensor: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """Add N(0, scale^2) noise in place (mergekit-moe's ``noise_scale``)."""
    if scale:
        tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * scale)
