"""One JSON file per finished run, so that an interrupted experiment resumes where it
stopped, plus a summary file rewritten after every run (the study's grid and collapse parts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class RunLog:
    """The finished runs of one experiment and its summary file.

    Args:
        summary: The summary JSON path.
        header: What the summary starts with (its settings, references, ...).
        runs_key: The summary's key for the list of runs (e.g. ``rows``).
        planned: How many runs are planned.
        order: Sort key of the runs in the summary.
    """

    def __init__(
        self,
        summary: Path,
        header: Mapping[str, Any],
        runs_key: str,
        planned: int,
        order: Callable[[dict[str, Any]], Any],
    ) -> None:
        self.summary, self.header, self.runs_key = summary, dict(header), runs_key
        self.planned, self.order = planned, order
        self.results: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    @staticmethod
    def finished(path: Path, **expected: Any) -> dict[str, Any] | None:
        """The result saved at ``path`` when it exists and has the ``expected`` entries
        (its settings, parameters, ...), else None."""
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved if all(saved.get(k) == v for k, v in expected.items()) else None

    def run(
        self,
        path: Path,
        compute: Callable[[], dict[str, Any]],
        resume: bool,
        also: Mapping[str, Any] | None = None,
        **expected: Any,
    ) -> dict[str, Any] | None:
        """Keep the result saved at ``path`` (``resume`` and it has the ``expected`` entries;
        ``also`` updates it) and return None, or compute, record and return a new one."""
        saved = self.finished(path, **expected) if resume else None
        if saved is not None:
            self.keep({**saved, **(also or {})})
            return None
        result = compute()
        self.record(path, result)
        return result

    def keep(self, result: dict[str, Any]) -> None:
        """Count a result that is already on disk (a resumed run)."""
        self.results.append(result)

    def record(self, path: Path, result: dict[str, Any]) -> dict[str, Any]:
        """Save a new run's result and rewrite the summary."""
        path.write_text(json.dumps(result, indent=1))
        self.results.append(result)
        return self.dump()

    def dump(self) -> dict[str, Any]:
        """Write the summary: header, sorted runs, completeness, seconds so far."""
        data = {
            **self.header,
            self.runs_key: sorted(self.results, key=self.order),
            "complete": len(self.results) == self.planned,
            f"planned_{self.runs_key}": self.planned,
            "seconds": time.perf_counter() - self.started,
        }
        self.summary.write_text(json.dumps(data, indent=1))
        return data
