"""The model card's file (``README.md``): written with the checkpoint (by the writers, inside
its temporary directory), and rewritten in one rename with the task pool's results once
FusionBench's program has evaluated the saved model. The text: ``fusion_bench_moect.model_card``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..model_card import CARD_FILE, with_results
from .checkpoint import write_text_atomically

log = logging.getLogger(__name__)


def add_results(directory: str | os.PathLike, report: Mapping[str, Any]) -> bool:
    """Put ``report`` into the card of ``directory`` (atomically); False where there is no
    card of ours to put it in."""
    path = Path(directory) / CARD_FILE
    try:
        card = path.read_text()
        updated = with_results(card, report)
    except (OSError, ValueError) as err:
        log.warning("The evaluation is not added to %s: %s", path, err)
        return False
    write_text_atomically(path, updated)
    log.info("Added the task pool's results to the model card %s", path)
    return True


def results_into_card(
    evaluate: Callable[..., Any], directory: str | os.PathLike
) -> Callable[..., Any]:
    """Wrap a FusionBench program's ``evaluate_merged_model`` so that its report also goes into
    the card of ``directory`` (the saved model it evaluates)."""

    def evaluate_and_record(taskpool: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        report = evaluate(taskpool, model, *args, **kwargs)
        if isinstance(report, Mapping):
            add_results(directory, report)
        return report

    return evaluate_and_record


def record_evaluation(program: Any, directory: str | os.PathLike | None) -> None:
    """Have FusionBench's ``program`` also put its evaluation report into the card of
    ``directory``, where the algorithm saved the model it returns (nothing without one)."""
    if directory and hasattr(program, "evaluate_merged_model"):
        program.evaluate_merged_model = results_into_card(program.evaluate_merged_model, directory)
