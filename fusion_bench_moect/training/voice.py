"""One voice per run: under several processes only rank 0 logs; others' warnings say whose.

Every rank runs the same code, so every INFO line (each step line, FusionBench's "Loading
model", ...) would appear once per process, each with its own timing. For the length of a
run, a filter on the handlers that print (the root logger's and transformers' own) drops the
records of ranks other than 0 below WARNING and starts their warnings with ``rank N:``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class RankFilter(logging.Filter):
    """Drop a non-zero rank's records below WARNING; name the rank in the others."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "moect_rank_named", False):  # a record may meet two handlers
            record.msg = f"rank {self.rank}: {record.msg}"
            record.moect_rank_named = True
        return True


def printing_handlers() -> list[logging.Handler]:
    """The handlers a record of the plugin, FusionBench or transformers reaches."""
    handlers = list(logging.getLogger().handlers)
    handlers += logging.getLogger("transformers").handlers  # transformers does not propagate
    return handlers


@contextmanager
def one_voice(rank: int) -> Iterator[None]:
    """Within the block, only rank 0 logs below WARNING (nothing changes on rank 0)."""
    if rank == 0:
        yield
        return
    rank_filter = RankFilter(rank)
    handlers = printing_handlers()
    for handler in handlers:
        handler.addFilter(rank_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(rank_filter)
