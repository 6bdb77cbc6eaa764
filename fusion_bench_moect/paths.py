"""Where the package keeps its downloads and derived models: one cache folder."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the cache folder (default ``~/.cache/fusion_bench_moect``).
CACHE_ENV = "FUSION_BENCH_MOECT_CACHE"


def cache_root() -> Path:
    """``$FUSION_BENCH_MOECT_CACHE``, or ``~/.cache/fusion_bench_moect``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "fusion_bench_moect"
