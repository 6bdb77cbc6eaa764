"""Offline evaluation: perplexity and routing diagnostics through a FusionBench task pool.

``MoETextTaskPool`` (the task pool) is imported lazily so that the pure helpers
(``routing``) do not pull in FusionBench. The text readers live in ``fusion_bench_moect.data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

__all__ = ["MoETextTaskPool"]


def __getattr__(name: str) -> Any:
    if name == "MoETextTaskPool":
        # Lazy: the task pool pulls in FusionBench and torch; routing and text stay cheap.
        from fusion_bench_moect.eval.taskpool import MoETextTaskPool

        return MoETextTaskPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
