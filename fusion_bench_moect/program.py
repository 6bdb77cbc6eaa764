"""What the plugin's algorithms tell FusionBench's program once ``run()`` has saved the model."""

from __future__ import annotations

from typing import Any

from fusion_bench.utils.hydra_utils import get_hydra_output_dir

from .errors import under_hydra
from .io.model_card import record_evaluation
from .schema import check_optional_path


class SavedBySaveCheckpoint:
    """Mixin for an algorithm whose ``save_checkpoint`` writes the model itself.

    FusionBench's program would then print "No save path specified for the merged model.
    Skipping saving." after our "Saved MoE checkpoint to ..." (once per process): it is told
    there is nothing left to save, unless its own ``merged_model_save_path`` asks for another
    copy. Its evaluation report also goes into the saved model's card (rank 0 writes).
    """

    save_checkpoint: Any = None

    def on_run_end(self) -> None:
        super().on_run_end()  # type: ignore[misc]
        program = getattr(self, "_program", None)
        _report_beside_the_logs(program)
        fabric = getattr(self, "_fabric_instance", None)
        if fabric is None or fabric.is_global_zero:
            record_evaluation(program, check_optional_path("save_checkpoint", self.save_checkpoint))
        if (
            self.save_checkpoint
            and hasattr(program, "save_merged_model")
            and getattr(program, "merged_model_save_path", None) is None
        ):
            program.save_merged_model = _saved_by_save_checkpoint


def _saved_by_save_checkpoint(model: Any) -> None:
    """Stands in for the program's ``save_merged_model`` once ``save_checkpoint`` wrote it."""


def _report_beside_the_logs(program: Any) -> None:
    """Without a logger (``fabric.loggers=null``) FusionBench's program has no ``log_dir`` and
    wrote its report to a folder literally named ``{log_dir}`` in the working directory; it
    goes to the run's Hydra output folder (its logs) instead."""
    path = getattr(program, "report_save_path", None)
    if not isinstance(path, str) or "{log_dir}" not in path or not under_hydra():
        return
    if getattr(program, "log_dir", None) is None:
        program.report_save_path = path.format(log_dir=get_hydra_output_dir())
