"""Progress bars that draw only on a terminal (and in notebooks)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm`` over ``iterable``, off when its output is not a terminal (or not ``enabled``).

    In log files and CI output each update would be one more line, and nested bars add
    cursor moves (``ESC[A``); tqdm's ``disable=None`` turns a bar off there. ``TQDM_DISABLE``
    still decides when set.
    """
    if not enabled:
        kwargs["disable"] = True
    elif "TQDM_DISABLE" not in os.environ:
        kwargs["disable"] = None
    return tqdm(iterable, **kwargs)
