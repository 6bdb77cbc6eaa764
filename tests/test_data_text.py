"""Text sources: the Debian Reference loader (held-out split), user files, folders and globs."""

from __future__ import annotations

import gzip

import pytest

from fusion_bench_moect.data import text
from fusion_bench_moect.data.text import (
    CHAPTERS,
    HELDOUT_CHAPTERS,
    DebianReferenceMissingError,
    apt_install_command,
    debian_reference_available,
    expand_paths,
    html_paragraphs,
    load_debian_reference,
    load_source,
)

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html><head><title>Chapter</title></head><body>
<div class="navheader"><p>Prev Next</p></div>
<div class="chapter"><div class="toc"><p>Table of Contents</p><dl><dt>1.1 Intro</dt></dl></div>
<p>{first}</p>
<div class="note"><table><tr><td><p>A  note
   spanning lines &amp; entities.</p></td></tr></table></div>
<pre class="screen">$ ls -l
<p>not a paragraph</p></pre>
<p>{second}</p>
<p>   </p>
</div>
<div class="navfooter"><p>Home</p></div>
</body></html>"""


def write_book(root, lang, paragraphs):
    """A fake Debian Reference: every chapter file, two paragraphs each."""
    for chapter in CHAPTERS:
        first, second = paragraphs(chapter)
        (root / f"{chapter}.{lang}.html").write_text(
            PAGE.format(first=first, second=second), encoding="utf-8"
        )


def test_html_paragraphs_keep_prose_only():
    html = PAGE.format(first="Hello <em>world</em>.", second="Second   one.")
    assert html_paragraphs(html) == [
        "Hello world.",
        "A note spanning lines & entities.",
        "Second one.",
    ]


def test_split_is_by_chapter_and_deterministic(tmp_path):
    write_book(tmp_path, "en", lambda c: (f"English {c} one.", f"English {c} two."))
    heldout = load_debian_reference("en", "heldout", root=tmp_path)
    train = load_debian_reference("en", "train", root=tmp_path)
    everything = load_debian_reference("en", "all", root=tmp_path)
    assert [d.name for d in heldout] == [f"debian-reference/en/{c}" for c in HELDOUT_CHAPTERS]
    assert HELDOUT_CHAPTERS == ("ch04", "ch08", "ch12")
    assert len(train) == len(CHAPTERS) - 3
    assert not {d.name for d in heldout} & {d.name for d in train}
    assert sorted(d.name for d in heldout + train) == sorted(d.name for d in everything)
    assert heldout[0].text == (
        "English ch04 one.\n\nA note spanning lines & entities.\n\nEnglish ch04 two."
    )
    assert load_debian_reference("en", "heldout", root=tmp_path) == heldout
    with pytest.raises(ValueError, match="heldout, train, all"):
        load_debian_reference("en", "test", root=tmp_path)


def test_untranslated_paragraphs_are_dropped(tmp_path):
    write_book(tmp_path, "en", lambda c: (f"English {c} one.", f"English {c} two."))
    write_book(tmp_path, "de", lambda c: (f"Deutsch {c} eins.", f"English {c} two."))
    (german,) = load_debian_reference("de", "heldout", root=tmp_path)[:1]
    # The English leftover goes; the note is identical in both editions and goes too.
    assert german.text == "Deutsch ch04 eins."
    kept = load_debian_reference("de", "heldout", root=tmp_path, drop_untranslated=False)[0]
    assert "English ch04 two." in kept.text


def test_missing_package_names_the_apt_command(tmp_path):
    write_book(tmp_path, "en", lambda c: ("a", "b"))
    assert debian_reference_available("en", tmp_path)
    assert not debian_reference_available("fr", tmp_path)
    with pytest.raises(DebianReferenceMissingError) as err:
        load_debian_reference("fr", root=tmp_path)
    assert "sudo apt-get install -y debian-reference-fr" in str(err.value)
    assert apt_install_command(["en", "de"]) == (
        "sudo apt-get update && sudo apt-get install -y debian-reference-en debian-reference-de"
    )
    with pytest.raises(ValueError, match="Unknown Debian Reference language"):
        load_debian_reference("xx", root=tmp_path)


def test_real_debian_reference_parallel_text(debian_reference):
    langs = ["en", "de", "fr", "es", "it"]
    debian_reference(*langs)
    sizes = {}
    for lang in langs:
        docs = load_debian_reference(lang, "heldout")
        assert [d.name.rsplit("/", 1)[1] for d in docs] == list(HELDOUT_CHAPTERS)
        sizes[lang] = sum(len(d.text) for d in docs)
        assert sizes[lang] > 20_000, lang
    english = load_debian_reference("en", "heldout")[0].text
    german = load_debian_reference("de", "heldout")[0].text
    assert english.startswith("When a person (or a program) requests access to the system")
    assert german.startswith("Wenn eine Person (oder ein Programm) Zugriff auf das System")
    assert not set(english.split("\n\n")) & set(german.split("\n\n"))


def test_user_files_folders_globs(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("markdown")
    (tmp_path / "page.html").write_text("<html><body><p>Para one.</p><p>Two</p></body></html>")
    with gzip.open(tmp_path / "z.txt.gz", "wt") as handle:
        handle.write("zipped text")

    assert [d.text for d in load_source(str(tmp_path / "a.txt"))] == ["ay"]
    assert [d.text for d in load_source(str(tmp_path))] == ["ay", "bee", "sea"]  # folder: *.txt
    assert [d.text for d in load_source(str(tmp_path / "*.md"))] == ["markdown"]
    assert [d.text for d in load_source(str(tmp_path / "**" / "*.txt"))] == ["ay", "bee", "sea"]
    assert load_source(str(tmp_path / "page.html"))[0].text == "Para one.\n\nTwo"
    assert load_source(str(tmp_path / "z.txt.gz"))[0].text == "zipped text"
    assert [
        d.text for d in load_source({"paths": [str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]})
    ] == [
        "bee",
        "ay",
    ]
    assert load_source({"path": str(tmp_path / "a.txt")})[0].text == "ay"
    assert load_source({"text": "literal"})[0].text == "literal"


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_paths(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
        expand_paths(tmp_path / "empty")
    with pytest.raises(ValueError, match="exactly one of"):
        load_source({"path": "a", "text": "b"})
    with pytest.raises(ValueError, match="exactly one of"):
        load_source({"split": "heldout"})
    monkeypatch.setattr(text, "DEBIAN_REFERENCE_DIR", tmp_path)
    with pytest.raises(DebianReferenceMissingError, match="apt-get install -y debian-reference-it"):
        load_source({"debian_reference": "it"})
