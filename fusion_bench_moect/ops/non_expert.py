"""Which non-expert tensors a merge covers (``non_expert_tensors``), and the row pieces an
elementwise merge works on. Pure logic, no I/O, no torch."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Most elements per piece of an elementwise merge: a 1 GB embedding is merged 16 MB (float32)
#: at a time, so the method's temporaries stay small whatever the vocabulary.
PIECE_ELEMENTS = 1 << 22


def select_tensors(names: Sequence[str], pattern: str | None) -> list[str]:
    """The names ``pattern`` selects (``re.search``; None selects all), in order.

    Args:
        names: The non-FFN tensor names of the base (hub names, e.g.
            ``model.layers.0.self_attn.q_proj.weight``).
        pattern: A regular expression, or None.

    Raises:
        ValueError: When the pattern selects nothing, with examples of the names.
    """
    if pattern is None:
        chosen = list(names)
    else:
        regex = re.compile(pattern)
        chosen = [name for name in names if regex.search(name)]
    if not chosen:
        examples = ", ".join(list(names)[:3])
        raise ValueError(
            f"non_expert_tensors {pattern!r} matches none of the base's {len(names)} non-FFN "
            f"tensors (e.g. {examples}); give a regular expression that re.search finds in "
            "some of them, e.g. self_attn, or null for all."
        )
    return chosen


def row_pieces(shape: Sequence[int], max_elements: int | None = None) -> list[slice]:
    """Consecutive slices of the first dimension (of a tensor with at least one), each at
    most ``max_elements`` elements (default ``PIECE_ELEMENTS``) but at least one row."""
    max_elements = PIECE_ELEMENTS if max_elements is None else max_elements
    rows = int(shape[0])
    per_row = 1
    for dim in shape[1:]:
        per_row *= int(dim)
    step = max(1, max_elements // max(per_row, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, max(rows, 1), step)]
