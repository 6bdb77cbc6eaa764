"""Host memory that the C allocator keeps after the tensors are gone.

glibc serves a large allocation from its own memory map, given back on ``free``, only above
its mmap threshold; the threshold starts at 128 KiB and rises to the largest block freed so
far (up to 32 MiB). Once training has freed one gathered FSDP2 layer, every later block below
32 MiB (expert slices, activations, all-gather pieces) comes from the heap, where a freed
block stays resident while a small live one sits above it. Measured on the SmolLM2 MoE with 8
full-size experts (bf16 build, 2 FSDP2 processes, router stage; docs/benchmarks.md): peak RSS
2.82 GB per process by default, 1.97 GB with the threshold fixed at 1 MiB (1.89 GB at 64
KiB), at the same speed. A fixed threshold also stops the rise, so a freed block above it
always goes back to the system.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: ``mallopt``'s parameter number of the mmap threshold (glibc's ``malloc.h``).
M_MMAP_THRESHOLD = -3
#: Blocks from this size on are mapped and given back when freed.
MMAP_THRESHOLD = 1 << 20
#: glibc's own environment variable for the threshold: a user's setting wins.
ENV = "MALLOC_MMAP_THRESHOLD_"


def give_back_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process.

    Args:
        threshold: The size from which allocations are memory-mapped.

    Returns:
        Whether it was set: False off Linux, without glibc's ``mallopt`` (musl accepts and
        ignores it), or where the user set ``MALLOC_MMAP_THRESHOLD_``.
    """
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", threshold)
    return done
