"""Write new files at known offsets, in any order, with the disk work on a background thread.

``PositionalWriter`` is the disk end of ``io.streaming``: the caller hands it bytes and the
file offset they belong at; they are copied into one of a few aligned staging buffers and a
background thread writes each full buffer while the caller computes the next tensor.

Files are opened with ``O_DIRECT`` where the system allows it (Linux, most local file
systems; not tmpfs): the bytes go from the staging buffer to the disk without the page-cache
copy and dirty-page throttling, which on a small virtual machine cost more CPU than the
whole computation (13.4 GB: 31 s of kernel time through the page cache, 0.3 s direct; see
docs/benchmarks.md). Direct writes must cover whole aligned blocks, so the partial blocks at
the edges of a run of bytes wait in memory until their other bytes arrive (every byte of a
file is written exactly once); the last block of a file is written padded, then the file is
truncated to its size. Where direct writes are refused the file is written through the page
cache instead; ``FUSION_BENCH_MOECT_DIRECT_IO=0`` always does. The bytes are the same.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Environment variable: ``0`` writes through the page cache (no ``O_DIRECT``).
DIRECT_IO_ENV = "FUSION_BENCH_MOECT_DIRECT_IO"
#: Alignment of direct writes (memory, file offset, length): any block size up to 4 KiB.
ALIGN = 4096
#: Staging buffers: while one is written, the next fills (measured: more or larger ones do
#: not write faster).
STAGE_BYTES = 16 << 20
STAGES = 3


def direct_io_wanted() -> bool:
    """Whether to try ``O_DIRECT`` (available, and not turned off by the environment)."""
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_ENV, "1") != "0"


@dataclass
class _File:
    """One file being written: its current run of contiguous bytes in a staging buffer and
    its partial edge blocks."""

    fd: int
    size: int
    align: int
    stage: mmap.mmap | None = None
    base: int = 0  # file offset of stage[0] (a multiple of ``align``)
    start: int = 0  # file offsets of the run's first byte and of the byte after its last
    end: int = 0
    edges: dict[int, list[Any]] = field(default_factory=dict)  # block -> [buffer, bytes in]


class PositionalWriter:
    """Write files of known sizes, each byte once, in any order; use as a context manager
    (an exception stops the thread and closes the files; the caller removes them).

    Args:
        direct: Try ``O_DIRECT`` (default: ``direct_io_wanted()``).
    """

    def __init__(self, direct: bool | None = None) -> None:
        self.direct = direct_io_wanted() if direct is None else direct
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(STAGES):
            self._free.put(mmap.mmap(-1, STAGE_BYTES))  # page-aligned
        self._jobs: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._error: BaseException | None = None
        self._files: dict[Any, _File] = {}
        self._thread = threading.Thread(target=self._run, name="moect-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> PositionalWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self, key: Any, path: str | os.PathLike, size: int) -> None:
        """Create (or empty) the file ``path`` of ``size`` bytes, known as ``key``."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        if self.direct:
            try:
                fd = os.open(Path(path), flags | os.O_DIRECT, 0o666)
                self._files[key] = _File(fd, size, ALIGN)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.direct = False  # e.g. tmpfs
        self._files[key] = _File(os.open(Path(path), flags, 0o666), size, 1)

    def write(self, key: Any, offset: int, data: memoryview) -> None:
        """Copy ``data`` to file ``key`` at ``offset`` (written in the background)."""
        f = self._files[key]
        if f.stage is not None and offset != f.end:
            self._flush(f)
        pos = 0
        while pos < len(data):
            if f.stage is None:
                self._raise()
                f.stage = self._free.get()
                f.start = f.end = offset + pos
                f.base = f.start - f.start % f.align
            n = min(STAGE_BYTES - (f.end - f.base), len(data) - pos)
            at = f.end - f.base
            f.stage[at : at + n] = data[pos : pos + n]
            f.end += n
            pos += n
            if f.end - f.base == STAGE_BYTES:
                self._flush(f)

    def finish(self, key: Any) -> None:
        """Close file ``key`` once all its bytes were given."""
        f = self._files.pop(key)
        if f.stage is not None:
            self._flush(f)
        if f.edges:
            self._jobs.put(("close", f.fd, None))
            raise RuntimeError(
                f"Internal error: {len(f.edges)} block(s) of a file were not fully written."
            )
        self._jobs.put(("close", f.fd, f.size))
        self._raise()

    def close(self) -> None:
        """Wait until everything is written; raises the background thread's error."""
        if self._files:
            self.abort()
            raise RuntimeError(f"Internal error: {len(self._files)} file(s) not finished.")
        self._jobs.put(("stop",))
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without finishing; closes the open files (the caller removes them)."""
        for f in self._files.values():
            self._jobs.put(("close", f.fd, None))
        self._files.clear()
        self._jobs.put(("stop",))
        self._thread.join()

    # -- the caller's side -------------------------------------------------------------

    def _flush(self, f: _File) -> None:
        """Hand the run's whole aligned blocks to the thread; its partial edges wait."""
        assert f.stage is not None
        start, end, base, align = f.start, f.end, f.base, f.align
        head_end = min(-(-start // align) * align, end)
        tail_start = max(end // align * align, head_end)
        if head_end > start:
            self._edge(f, start, f.stage[start - base : head_end - base])
        if end > tail_start:
            self._edge(f, tail_start, f.stage[tail_start - base : end - base])
        if tail_start > head_end:
            span = (head_end - base, tail_start - base)
            self._jobs.put(("write", f.fd, f.stage, span, head_end, True))
        else:
            self._free.put(f.stage)
        f.stage = None

    def _edge(self, f: _File, offset: int, data: bytes) -> None:
        """Add bytes to a partial block; write the block once all of its bytes are in."""
        block = offset // f.align
        entry = f.edges.setdefault(block, [mmap.mmap(-1, f.align), 0])
        at = offset - block * f.align
        entry[0][at : at + len(data)] = data
        entry[1] += len(data)
        if entry[1] == min(f.align, f.size - block * f.align):
            del f.edges[block]
            self._jobs.put(("write", f.fd, entry[0], (0, f.align), block * f.align, False))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the background thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job[0] == "stop":
                return
            try:
                if self._error is None:
                    self._do(job)
            except BaseException as err:  # re-raised in the caller's thread
                self._error = err
            finally:
                if job[0] == "write" and job[5]:
                    self._free.put(job[2])
                elif job[0] == "close":
                    os.close(job[1])

    def _do(self, job: tuple[Any, ...]) -> None:
        if job[0] == "close":
            _, fd, size = job
            if size is not None and os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # drop the padding of the last direct block
            return
        _, fd, buffer, (lo, hi), offset, _ = job
        view = memoryview(buffer)[lo:hi]
        try:
            _pwrite_all(fd, view, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not hasattr(os, "O_DIRECT"):
                raise
            # The file system took O_DIRECT at open but refuses the write: go through the
            # page cache for this file (alignment no longer matters).
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _pwrite_all(fd, view, offset)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:  # writes may be partial
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
