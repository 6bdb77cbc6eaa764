"""Progress bars that draw only on a terminal (and in notebooks), ours and transformers'."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


def bars_draw() -> bool:
    """Whether ``progress`` bars draw here: stderr is a terminal or a notebook runs this, and
    ``TQDM_DISABLE`` is not set."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty() or "ipykernel" in sys.modules


@contextmanager
def library_bars(enabled: bool = True) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") under the same
    policy for the block: off where ``progress`` bars would not draw (a log file: one ``\\r``
    line each) or when not ``enabled`` (another process's copy of the same bar)."""
    # Lazy: the lean CLI imports this module before transformers is needed.
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not (enabled and bars_draw()):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
