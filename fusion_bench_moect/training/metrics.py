"""What a training run measures: per-step losses and routing balance, held-out evaluation.

Each optimiser step sums losses and routing counts over its micro-batches, all-reduces them
over the processes (so the record describes the global batch) and turns them into one record
(``StepStats.finish``) that goes to the history, the Fabric loggers and, every ``log_every``
steps, one log line. Held-out evaluation uses ``MoETextTaskPool``'s machinery with its window
length, so its perplexities compare with the task pool's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..arch import router_scoring
from ..eval.routing import RoutingAccumulator, summarize_layers
from ..eval.taskpool import MoETextTaskPool
from .config import TrainingConfig
from .freeze import TrainingPlan

log = logging.getLogger(__name__)

BALANCE_KEYS = (
    "mean_cv",
    "mean_max_violation",
    "mean_router_entropy",
    "dead_experts",
    "mean_anchor_share",
)
_LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss")


class StepStats:
    """Losses and routing counts of one optimiser step's micro-batches on this process."""

    def __init__(self, plan: TrainingPlan) -> None:
        info = plan.info
        self.sums = torch.zeros(len(_LOSSES) + 2, dtype=torch.float64)  # + batches, tokens
        self.routing = RoutingAccumulator(
            len(info.moe_layers), info.num_experts, info.top_k, router_scoring(info.model_type)
        )
        self.anchors = plan.anchors

    def add(
        self,
        losses: Mapping[str, torch.Tensor | None],
        tokens: int,
        router_logits: Sequence[torch.Tensor],
        selected: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """One micro-batch: its losses (None: not computed), token count, router logits and
        (routers whose selection is not their logits' top-k) the selected experts."""
        values = [float(v.detach()) if v is not None else 0.0 for v in map(losses.get, _LOSSES)]
        self.sums += torch.tensor([*values, 1.0, float(tokens)], dtype=torch.float64)
        if selected is not None:
            selected = [s.detach().cpu() for s in selected]
        self.routing.update(
            [logits.detach().float().cpu() for logits in router_logits], selected=selected
        )

    def finish(
        self, fabric: Any, step: int, coef: float, lr: float, seconds: float
    ) -> dict[str, Any]:
        """The step's record over every process's micro-batches."""
        routing = self.routing
        packed = torch.cat(
            [
                self.sums,
                torch.tensor([*routing.entropy_sums, routing.num_tokens], dtype=torch.float64),
                routing.counts.flatten().double(),
            ]
        )
        if fabric.world_size > 1:
            packed = fabric.all_reduce(fabric.to_device(packed), reduce_op="sum").cpu()
        sums, rest = packed[: len(self.sums)], packed[len(self.sums) :]
        layers = routing.counts.shape[0]
        routing.entropy_sums = rest[:layers].tolist()
        routing.num_tokens = int(rest[layers])
        routing.counts = rest[layers + 1 :].round().long().view_as(routing.counts)
        summary = summarize_layers(routing.layer_reports(anchors=self.anchors))
        count = float(sums[len(_LOSSES)])
        return {
            "step": step,
            **{name: float(sums[i]) / count for i, name in enumerate(_LOSSES)},
            "aux_coef": coef,
            "lr": lr,
            "tokens_per_s": float(sums[-1]) / max(seconds, 1e-9),
            **{k: summary[k] for k in BALANCE_KEYS},
        }


def log_line(h: Mapping[str, Any]) -> None:
    log.info(
        "step %d: loss %.4f (lm %.4f, aux %.4f) lr %.2e cv %.3f maxvio %.3f entropy %.3f "
        "dead %d anchor share %s, %.0f tokens/s",
        h["step"],
        h["loss"],
        h["lm_loss"],
        h["aux_loss"],
        h["lr"],
        h["mean_cv"],
        h["mean_max_violation"],
        h["mean_router_entropy"],
        h["dead_experts"],
        "-" if h["mean_anchor_share"] is None else f"{h['mean_anchor_share']:.3f}",
        h["tokens_per_s"],
    )
    if "bias_min" in h:
        log.info("step %d: router bias in [%.4f, %.4f]", h["step"], h["bias_min"], h["bias_max"])


def send_to_loggers(fabric: Any, record: Mapping[str, Any]) -> None:
    """A step record to the Fabric loggers (None: a metric without meaning here)."""
    fabric.log_dict(
        {
            f"train/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))  # not bias_range's list
        },
        step=record["step"],
    )


class Evaluator:
    """Held-out perplexity and routing during training, as ``MoETextTaskPool`` scores them."""

    def __init__(self, config: TrainingConfig, tokenizer: Any, sources: dict[str, Any]) -> None:
        self.pool = MoETextTaskPool(
            sources=sources,
            max_tokens_per_source=config.eval_max_tokens_per_source,
            window_length=config.eval_window,
            batch_size=config.eval_batch_size,
            reference_models=[],
            plots=False,
            show_progress=False,
        )
        self.pool._tokenizer_obj = tokenizer
        self.pool.load_windows(tokenizer)  # bad sources fail before training

    def evaluate(self, fabric: Any, module: Any, step: int, everywhere: bool) -> dict | None:
        """Score on rank 0 (``everywhere``: every rank runs the forward passes, as sharded
        parameters need); return rank 0's record, log it, and wait for the other ranks."""
        entry = None
        if everywhere or fabric.is_global_zero:
            report = self.pool.evaluate_model(module, label=f"step {step}")
            if fabric.is_global_zero:
                entry = self._record(report, step)
                self._log(fabric, entry)
        fabric.barrier()
        return entry

    @staticmethod
    def _record(report: Mapping[str, Any], step: int) -> dict[str, Any]:
        routing = report.get("routing") or {}
        overall = routing.get("overall") or {}
        return {
            "step": step,
            "perplexity": report["perplexity"],
            "overall_perplexity": report["overall_perplexity"],
            **{k: overall.get(k) for k in BALANCE_KEYS},
            "per_source_shares": routing.get("per_source_shares"),
        }

    @staticmethod
    def _log(fabric: Any, entry: Mapping[str, Any]) -> None:
        fabric.log_dict(
            {
                "eval/overall_perplexity": entry["overall_perplexity"],
                **{f"eval/perplexity/{k}": v for k, v in entry["perplexity"].items()},
                **{f"eval/{k}": v for k, v in entry.items() if k in BALANCE_KEYS and v is not None},
            },
            step=entry["step"],
        )
        log.info(
            "eval at step %d (windows of the task pool's length): perplexity %s",
            entry["step"],
            ", ".join(f"{k} {v:.2f}" for k, v in entry["perplexity"].items()),
        )
