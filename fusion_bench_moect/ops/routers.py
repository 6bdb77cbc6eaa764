"""Router (gate) initialisation, scaling and diagnostics (docs/algorithm.md, "What is built"). Pure math, no I/O."""

from __future__ import annotations

import torch


def seeded_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``seed`` and the stream ids.

    Every random feature (routers, noise, drop) of every layer gets its own stream, so
    turning one feature on never changes the random numbers of another.
    """
    value = int(seed) & 0xFFFFFFFF
    for part in stream:
        # 64-bit FNV-1a style mixing keeps streams distinct and deterministic.
        value = ((value ^ (int(part) + 0x9E3779B9)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator(device="cpu").manual_seed(value)


def orthogonal_rows(num_rows: int, hidden_size: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 (num_rows, hidden_size) matrix with orthonormal rows (R R^T = I).

    Raises:
        ValueError: If ``num_rows > hidden_size`` (no such matrix exists).
    """
    if num_rows > hidden_size:
        raise ValueError(
            f"gate_mode 'orthogonal' needs at most hidden_size={hidden_size} distinct router rows, "
            f"got {num_rows}; lower num_experts, raise granularity, or use gate_mode 'random'."
        )
    gaussian = torch.randn(hidden_size, num_rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Sign fix makes the draw Haar-uniform instead of biased by QR's sign convention.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.contiguous().to(torch.float32)


def random_rows(
    mode: str, num_rows: int, hidden_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Router rows for the prompt-free gate modes, float32 (num_rows, hidden_size)."""
    if mode == "orthogonal":
        return orthogonal_rows(num_rows, hidden_size, generator)
    if mode == "random":
        return torch.randn(num_rows, hidden_size, generator=generator, dtype=torch.float32)
    if mode == "uniform_random":
        bound = hidden_size**-0.5
        rows = torch.rand(num_rows, hidden_size, generator=generator, dtype=torch.float32)
        return rows * (2 * bound) - bound
    raise ValueError(
        f"Unknown prompt-free gate_mode {mode!r}; valid: orthogonal, random, uniform_random."
    )


def expand_groups(group_rows: torch.Tensor, granularity: int) -> torch.Tensor:
    """Repeat each group's row for the G fine-grained experts of that group."""
    return group_rows.repeat_interleave(granularity, dim=0)


def scale_anchor_rows(
    router: torch.Tensor, anchor_indices: list[int], scale: float
) -> torch.Tensor:
    """Multiply only the anchor experts' rows by ``scale`` (their logits grow by that factor).

    Scaling every row would only change the softmax temperature and favour no expert.
    """
    if scale == 1.0 or not anchor_indices:
        return router
    out = router.clone()
    out[anchor_indices] *= scale
    return out


def condition_number(rows: torch.Tensor) -> float:
    """Ratio of largest to smallest singular value of the distinct router rows."""
    singular = torch.linalg.svdvals(rows.to(torch.float32))
    smallest = float(singular[-1])
    return float("inf") if smallest == 0.0 else float(singular[0]) / smallest


def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row (zero rows stay zero)."""
    norms = rows.norm(dim=-1, keepdim=True)
    return rows / torch.where(norms > 0, norms, torch.ones_like(norms))


def group_routing_problem(
    num_experts: int, experts_per_token: int, granularity: int, n_group: int, topk_group: int
) -> str | None:
    """What is wrong with group-limited routing (DeepSeek-V3's ``n_group`` / ``topk_group``)
    for this many experts, or None.

    A token's experts come from its ``topk_group`` best of ``n_group`` equal groups, each
    group scored by the sum of its two best experts (as transformers does). So ``n_group``
    divides E, every group has at least two experts and whole FFNs (multiples of G, so that a
    group never splits one), and the chosen groups hold at least k experts.
    """
    e, k, g = num_experts, experts_per_token, granularity
    if e % n_group:
        return f"n_group={n_group} does not divide num_experts={e}; choose a divisor of {e}."
    size = e // n_group
    if size < 2:
        return (
            f"n_group={n_group} leaves {size} expert per group, but a group is scored by its "
            f"best two experts; use n_group <= {e // 2}."
        )
    if size % g:
        return (
            f"n_group={n_group} gives groups of {size} experts, which split the FFNs of "
            f"granularity {g}; choose n_group so that {g} divides num_experts / n_group."
        )
    if topk_group > n_group:
        return f"topk_group={topk_group} exceeds n_group={n_group}; use topk_group <= n_group."
    if topk_group * size < k:
        return (
            f"topk_group={topk_group} groups of {size} experts hold fewer than "
            f"experts_per_token={k}; raise topk_group to {-(-k // size)} or lower n_group."
        )
    return None
