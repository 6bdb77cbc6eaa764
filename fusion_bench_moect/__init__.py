"""fusion-bench-moect: MoE upcycling and MoE-CT merging as a FusionBench algorithm.

Heavy modules (torch, transformers, fusion_bench) are imported on first use of a public name,
so ``import fusion_bench_moect`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "OrthogonalMoECTMergingAlgorithm": "fusion_bench_moect.algorithm",
    "MoECTTrainingAlgorithm": "fusion_bench_moect.training",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusion_bench_moect' has no attribute {name!r}")
