"""Sections of docs/study.md that a study part writes between its own markers.

A part (balancing, forgetting) renders its section from its summary and puts it into the
document in place of its previous one; the full report rewrites the rest of the document and
keeps, at its end, everything from the first such section on (the sections and the notes
written after them by hand).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path


class Section:
    """The markers of one part's section (``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``)."""

    def __init__(self, name: str) -> None:
        self.begin, self.end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        self._pattern = re.compile(
            re.escape(self.begin) + ".*?" + re.escape(self.end) + "\n?", re.S
        )

    def read(self, doc: Path) -> str | None:
        """The section in ``doc``, if it has one."""
        found = self._pattern.search(doc.read_text()) if doc.exists() else None
        return found.group(0) if found else None

    def write(self, doc: Path, section: str) -> None:
        """Put ``section`` into ``doc`` in place of its previous one (else at the end)."""
        text = doc.read_text() if doc.exists() else ""
        if self._pattern.search(text):
            text = self._pattern.sub(lambda _: section, text)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        doc.write_text(text)


def read_tail(doc: Path, sections: Sequence[Section]) -> str | None:
    """``doc`` from the first of ``sections`` to the end, which a rewrite of the rest keeps."""
    text = doc.read_text() if doc.exists() else ""
    starts = [text.index(s.begin) for s in sections if s.begin in text]
    return text[min(starts) :] if starts else None


def append_tail(doc: Path, tail: str) -> None:
    """Put back what ``read_tail`` kept, at the end of the rewritten ``doc``."""
    doc.write_text(doc.read_text().rstrip("\n") + "\n\n" + tail)
