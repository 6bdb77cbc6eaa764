"""lm-eval hooks of the ``moect_debian_reference_*`` tasks: the dataset (held-out chapters of
the installed Debian Reference, read by ``fusion_bench_moect.data.text``, nothing downloaded)
and the word / byte counts of the rolling-loglikelihood metrics."""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset, DatasetDict

from fusion_bench_moect.data.text import load_debian_reference


def load(language: str = "en", split: str = "heldout", **_: Any) -> Any:
    """A ``DatasetDict`` with one ``test`` split: one document per chapter of ``split``."""
    docs = load_debian_reference(language, split)
    rows = [{"name": d.name, "text": d.text} for d in docs if d.text.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """(loglikelihood, words) and (loglikelihood, bytes) of one document."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    num_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
