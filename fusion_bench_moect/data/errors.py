"""The error of unusable training data (shared by the readers and the token store)."""

from __future__ import annotations


class TrainingDataError(ValueError):
    """A training source cannot be used (empty, not UTF-8, too small, malformed)."""
