"""Plain-text sources for offline evaluation.

Two kinds of source:

* **The Debian Reference** (Osamu Aoki), the same book in several languages, installed
  by Debian's ``debian-reference-<lang>`` packages under ``/usr/share/debian-reference``
  as one XHTML file per chapter (``pr01``, ``ch01`` .. ``ch12``, ``apa``). The loader
  keeps the prose (the text of every ``<p>`` element outside the table of contents and
  the navigation bars; code listings are ``<pre>`` and are not paragraphs) and splits the
  book **by chapter**, the same way in every language:

  - ``heldout``: chapters 4, 8 and 12 (``HELDOUT_CHAPTERS``), for evaluation;
  - ``train``: every other chapter (preface, 1-3, 5-7, 9-11, appendix A), for
    fine-tuning;
  - ``all``: the whole book.

  Translations leave some paragraphs in English. In a non-English edition, a paragraph
  that appears verbatim in the same chapter of the English edition is dropped (when
  ``debian-reference-en`` is installed), so a "German" source is German prose.

* **User files**: a file, a folder (its ``*.txt`` files, recursively) or a glob. Files
  ending in ``.gz`` are decompressed, ``.html``/``.htm``/``.xhtml`` files go through the
  same paragraph extractor, everything else is read as UTF-8 text.

Everything here is deterministic: the same installed files give the same documents in
the same order.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEBIAN_REFERENCE_DIR = Path("/usr/share/debian-reference")
"""Where the ``debian-reference-<lang>`` packages install the book."""

DEBIAN_REFERENCE_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "id", "ja", "zh-cn", "zh-tw")
"""Languages Debian packages the book in (``debian-reference-<lang>``)."""

CHAPTERS = ("pr01", *(f"ch{i:02d}" for i in range(1, 13)), "apa")
"""Chapter files of the book, in reading order."""

HELDOUT_CHAPTERS = ("ch04", "ch08", "ch12")
"""The fixed held-out split: chapters 4 (authentication), 8 (i18n/l10n), 12 (programming)."""

SPLITS = ("heldout", "train", "all")

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_SKIPPED_DIV_CLASSES = frozenset(
    {"toc", "navheader", "navfooter", "list-of-tables", "list-of-figures", "list-of-examples"}
)


class DebianReferenceMissingError(FileNotFoundError):
    """Raised when a ``debian-reference-<lang>`` package is not installed."""


@dataclass(frozen=True)
class TextDocument:
    """One document of a text source.

    Attributes:
        name: Where the text came from (a file path, or ``debian-reference/<lang>/<chapter>``).
        text: The plain text; paragraphs are separated by a blank line.
    """

    name: str
    text: str


class _ParagraphExtractor(HTMLParser):
    """Collects the whitespace-normalised text of every ``<p>`` outside skipped regions."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._div_skips: list[bool] = []
        self._skip_depth = 0
        self._in_paragraph = False
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div":
            classes = (dict(attrs).get("class") or "").split()
            skipped = any(c in _SKIPPED_DIV_CLASSES for c in classes)
            self._div_skips.append(skipped)
            self._skip_depth += skipped
        elif tag in ("pre", "script", "style", "head"):
            self._skip_depth += 1
        elif tag == "p" and not self._skip_depth:
            self._flush()
            self._in_paragraph = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._div_skips:
                self._skip_depth -= self._div_skips.pop()
        elif tag in ("pre", "script", "style", "head"):
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "p":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_paragraph and not self._skip_depth:
            self._buffer.append(data)

    def _flush(self) -> None:
        if self._in_paragraph:
            text = " ".join("".join(self._buffer).split())
            if text:
                self.paragraphs.append(text)
        self._in_paragraph = False
        self._buffer = []

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(html: str) -> list[str]:
    """Extract the prose paragraphs of an (X)HTML page.

    Args:
        html: The page source.

    Returns:
        The text of every ``<p>`` element, whitespace-normalised, in document order,
        skipping tables of contents, navigation bars, ``<pre>`` blocks and the head.
    """
    parser = _ParagraphExtractor()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def apt_install_command(languages: Iterable[str]) -> str:
    """The exact command that installs the Debian Reference in ``languages``."""
    packages = " ".join(f"debian-reference-{lang}" for lang in languages)
    return f"sudo apt-get update && sudo apt-get install -y {packages}"


def _chapter_path(root: Path, chapter: str, lang: str) -> Path:
    return root / f"{chapter}.{lang}.html"


def debian_reference_available(lang: str, root: str | os.PathLike | None = None) -> bool:
    """Whether every chapter of the Debian Reference in ``lang`` is installed."""
    root = Path(root) if root is not None else DEBIAN_REFERENCE_DIR
    return all(_chapter_path(root, c, lang).is_file() for c in CHAPTERS)


def _require_debian_reference(lang: str, root: Path) -> None:
    if lang not in DEBIAN_REFERENCE_LANGUAGES:
        raise ValueError(
            f"Unknown Debian Reference language {lang!r}; Debian packages the book in: "
            f"{', '.join(DEBIAN_REFERENCE_LANGUAGES)}."
        )
    missing = [c for c in CHAPTERS if not _chapter_path(root, c, lang).is_file()]
    if missing:
        raise DebianReferenceMissingError(
            f"The Debian Reference in {lang!r} is not installed: {_chapter_path(root, missing[0], lang)} "
            f"is missing. Install it with:\n    {apt_install_command([lang])}\n"
            "(the project's set-up installs en, de, fr, es and it: "
            f"{apt_install_command(['en', 'de', 'fr', 'es', 'it'])})"
        )


def _chapters_of_split(split: str) -> tuple[str, ...]:
    if split == "heldout":
        return HELDOUT_CHAPTERS
    if split == "train":
        return tuple(c for c in CHAPTERS if c not in HELDOUT_CHAPTERS)
    if split == "all":
        return CHAPTERS
    raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


def load_debian_reference(
    lang: str,
    split: str = "heldout",
    root: str | os.PathLike | None = None,
    drop_untranslated: bool = True,
) -> list[TextDocument]:
    """Load one language of the Debian Reference as plain text, one document per chapter.

    Args:
        lang: Language code, e.g. ``"en"``, ``"de"``, ``"fr"`` (package ``debian-reference-<lang>``).
        split: ``"heldout"`` (chapters 4, 8, 12), ``"train"`` (all other chapters) or ``"all"``.
        root: Folder holding the chapter files; default ``/usr/share/debian-reference``.
        drop_untranslated: In a non-English edition, drop paragraphs that appear verbatim in
            the same chapter of the English edition (needs ``debian-reference-en``; skipped
            with a warning when it is not installed).

    Returns:
        The chapters of the split in reading order, each as a ``TextDocument``.

    Raises:
        DebianReferenceMissingError: If the package for ``lang`` is not installed; the
            message gives the exact ``apt-get`` command.
        ValueError: For an unknown language or split.
    """
    root = Path(root) if root is not None else DEBIAN_REFERENCE_DIR
    chapters = _chapters_of_split(split)
    _require_debian_reference(lang, root)
    filter_english = drop_untranslated and lang != "en"
    if filter_english and not debian_reference_available("en", root):
        log.warning(
            "debian-reference-en is not installed, so untranslated (English) paragraphs stay "
            "in the %r text. Install it with: %s",
            lang,
            apt_install_command(["en"]),
        )
        filter_english = False
    documents = []
    for chapter in chapters:
        paragraphs = html_paragraphs(_chapter_path(root, chapter, lang).read_text("utf-8"))
        if filter_english:
            english = set(html_paragraphs(_chapter_path(root, chapter, "en").read_text("utf-8")))
            paragraphs = [p for p in paragraphs if p not in english]
        documents.append(
            TextDocument(name=f"debian-reference/{lang}/{chapter}", text="\n\n".join(paragraphs))
        )
    return documents


def read_text_file(path: str | os.PathLike) -> str:
    """Read one user file as plain text (``.gz`` decompressed, HTML reduced to paragraphs)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    inner_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if inner_suffix.lower() in HTML_SUFFIXES:
        return "\n\n".join(html_paragraphs(text))
    return text


def expand_paths(pattern: str | os.PathLike) -> list[Path]:
    """Files named by a path, a folder (its ``*.txt`` files, recursively) or a glob.

    Args:
        pattern: A file, a folder or a glob pattern (``~`` and environment variables
            are expanded).

    Returns:
        The matching files, sorted by path.

    Raises:
        FileNotFoundError: If nothing matches.
    """
    expanded = os.path.expandvars(os.path.expanduser(str(pattern)))
    path = Path(expanded)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"The folder {path} holds no *.txt files.")
        return files
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"The glob {expanded!r} matches no files.")
        return files
    raise FileNotFoundError(f"Text source {expanded!r} does not exist.")


def source_kind(
    spec: Mapping[str, Any],
    kinds: Sequence[str],
    what: str,
    error: type[Exception] = ValueError,
) -> str:
    """The one key of ``kinds`` that a source mapping uses.

    Raises:
        error: When the mapping has none, or more than one, of ``kinds``.
    """
    found = [k for k in kinds if k in spec]
    if len(found) != 1:
        names = ", ".join(repr(k) for k in kinds[:-1]) + f" or {kinds[-1]!r}"
        raise error(
            f"A {what} source mapping needs exactly one of {names}; got keys {sorted(spec)}."
        )
    return found[0]


def load_source(spec: str | os.PathLike | Mapping[str, Any]) -> list[TextDocument]:
    """Load the documents of one named text source.

    Args:
        spec: Either a path / folder / glob (string), or a mapping with one of

            - ``debian_reference: <lang>`` and optional ``split`` (default ``heldout``),
              ``root`` and ``drop_untranslated``;
            - ``path: <path, folder or glob>`` or ``paths: [<...>, ...]``;
            - ``text: <literal text>``.

    Returns:
        The source's documents, in a deterministic order.

    Raises:
        ValueError: For a mapping with none (or more than one) of the keys above.
        FileNotFoundError: For paths that match nothing, or a missing Debian package.
    """
    if isinstance(spec, (str, os.PathLike)):
        return [TextDocument(str(p), read_text_file(p)) for p in expand_paths(spec)]
    if not isinstance(spec, Mapping):
        raise ValueError(f"A text source must be a path/glob or a mapping, got {spec!r}.")
    kind = source_kind(spec, ("debian_reference", "path", "paths", "text"), "text")
    if kind == "debian_reference":
        return load_debian_reference(
            str(spec["debian_reference"]),
            split=str(spec.get("split", "heldout")),
            root=spec.get("root"),
            drop_untranslated=bool(spec.get("drop_untranslated", True)),
        )
    if kind == "text":
        return [TextDocument("<text>", str(spec["text"]))]
    patterns = [spec["path"]] if kind == "path" else list(spec["paths"])
    documents = []
    for pattern in patterns:
        documents.extend(load_source(str(pattern)))
    return documents
