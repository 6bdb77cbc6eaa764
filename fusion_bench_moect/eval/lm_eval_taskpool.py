"""lm-evaluation-harness through FusionBench, offline, on the models this plugin writes.

``MoELMEvalHarnessTaskPool`` is FusionBench's ``LMEvalHarnessTaskPool`` (same parameters,
same Fabric set-up of the model) with what an offline run of an in-memory MoE needs:

- the tasks shipped in ``lm_eval_tasks/`` (rolling-loglikelihood word perplexity and bits
  per byte over the held-out Debian Reference chapters, per language, from the installed
  ``debian-reference-<lang>`` packages) are found without an ``include_path``, and only
  those are indexed unless ``include_defaults`` (lm-eval's own tasks need the hub);
- the tokenizer comes from the model pool when the model is not a directory (a freshly
  built MoE has no ``name_or_path``), and the window length can be set (``max_length``);
- the results are returned, so they land in FusionBench's report, and written as JSON.

Needs ``pip install 'fusion-bench-moect[lm-eval]'`` (``lm-eval<=0.4.9.2``: FusionBench's
task pool imports ``lm_eval.__main__`` functions that 0.4.10 removed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .._compat import ensure_lm_eval_importable
from ..errors import one_line_errors
from .taskpool import to_jsonable

ensure_lm_eval_importable()
import lightning.fabric  # noqa: E402
from fusion_bench.taskpool.lm_eval_harness import LMEvalHarnessTaskPool  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

log = logging.getLogger(__name__)

#: The task YAMLs shipped with the package.
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


class MoELMEvalHarnessTaskPool(LMEvalHarnessTaskPool):
    """FusionBench's lm-eval task pool, offline, with this package's tasks.

    Args:
        tasks: Task names, e.g. ``[moect_debian_reference_en, moect_debian_reference_de]``.
        include_path: Extra task folders, searched besides the shipped ones.
        include_defaults: Also index lm-eval's built-in tasks (slower; most need the hub).
        tokenizer: Tokenizer directory; default the model's own directory, else the model
            pool's ``tokenizer``.
        max_length: Tokens per rolling window; default the model's context length.
        limit: Documents per task (None = all): for quick checks.
        batch_size, output_path, log_samples, verbosity, apply_chat_template: As for
            ``LMEvalHarnessTaskPool``; ``output_path`` defaults to the run's log directory.
    """

    def __init__(
        self,
        tasks: str | list[str],
        include_path: str | None = None,
        include_defaults: bool = False,
        tokenizer: str | None = None,
        max_length: int | None = None,
        limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, include_path=include_path, **kwargs)
        self.include_defaults = include_defaults
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.limit = limit

    def _tokenizer_path(self, model: Any) -> str:
        candidates = [self.tokenizer]
        candidates.append(getattr(getattr(model, "config", None), "_name_or_path", None))
        program = getattr(self, "_program", None)
        pool = getattr(program, "modelpool", None) if program is not None else None
        pool_tokenizer = getattr(pool, "tokenizer", None)
        candidates.append(pool_tokenizer if isinstance(pool_tokenizer, str) else None)
        for path in candidates:
            if path and (Path(path) / "tokenizer_config.json").is_file():
                return str(path)
        raise ValueError(
            "MoELMEvalHarnessTaskPool finds no tokenizer: set taskpool.tokenizer to a tokenizer "
            "directory, or give the model pool a `tokenizer`."
        )

    def _task_names(self) -> list[str]:
        return [self.tasks] if isinstance(self.tasks, str) else [str(t) for t in self.tasks]

    @one_line_errors
    def evaluate(self, model: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the tasks on ``model``; returns ``{task: {metric: value}}`` (also written to
        ``output_path/results.json``)."""
        tokenizer = self._tokenizer_path(model)
        paths = [str(TASKS_DIR)] + ([str(self.include_path)] if self.include_path else [])
        manager = TaskManager(
            verbosity=self.verbosity,
            include_path=paths,
            include_defaults=bool(self.include_defaults),
        )
        if not lightning.fabric.is_wrapped(model):
            model = self.fabric.setup(model)
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        log.info("lm-eval tasks %s (tokenizer %s)", self._task_names(), tokenizer)
        output = simple_evaluate(
            model=lm,
            # As one ad-hoc group: lm-eval 0.4.9.2 cannot log the path of a task outside its
            # own folder (pretty_print_task) unless the task is inside a group.
            tasks=[{"group": "fusion_bench_moect", "task": self._task_names()}],
            task_manager=manager,
            limit=self.limit,
            log_samples=bool(self.log_samples),
            apply_chat_template=bool(self.apply_chat_template),
            verbosity=self.verbosity,
            **kwargs,
        )
        results = {
            task: {
                key.split(",")[0]: value
                for key, value in metrics.items()
                if key != "alias" and not key.endswith("_stderr,none")
            }
            for task, metrics in output["results"].items()
            if task != "fusion_bench_moect"
        }
        report = to_jsonable({"results": results, "n_samples": output.get("n-samples", {})})
        out_dir = Path(self.output_path or os.path.join(self.log_dir, "lm_eval_results"))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        for task, metrics in results.items():
            log.info(
                "%s: %s",
                task,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float)),
            )
        return report
