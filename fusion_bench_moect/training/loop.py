"""The training loop: micro-batches, accumulation, one optimiser step, the periodic work.

``TrainRun`` is everything ``MoECTTrainingAlgorithm.run`` sets up (model, optimiser, data,
frozen anchors, history); ``TrainingLoop`` runs it from a position (step, epoch, micro-batches
of the epoch already used) to the last step. Evaluation and step checkpoints are the
``on_step`` callback's business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..progress import progress
from .config import TrainingConfig, uses_aux_loss
from .freeze import AnchorGuard, TrainingPlan
from .losses import aux_loss_coefficient, router_z_loss
from .metrics import StepStats, log_line, send_to_loggers
from .optim import scheduler_steps_before_optimizer
from .sampler import WindowBatchSampler

Position = dict[str, int]
"""``{"step", "epoch", "skip"}``: optimiser steps done, the epoch, its micro-batches used."""


@dataclass
class TrainRun:
    """A training run as set up: Fabric-wrapped model and optimiser, data, plan, history.

    Attributes:
        model: The model as Fabric wrapped it.
        optimizer: The Fabric-wrapped optimiser.
        scheduler: The LR schedule (None: constant).
        loader: This rank's micro-batches.
        sampler: Their order (per epoch, resumable).
        plan: What trains and which anchor rows stay.
        guard: Keeps the anchor rows bit-identical.
        experts: Expert parameters (their gradients are dropped during a router warm-up).
        trainable: Names of the trainable parameters (as in the unwrapped model).
        total: Optimiser steps in all.
        steps_per_epoch: Optimiser steps per pass over the data.
        tokenizer: The model's tokenizer.
        sharded: Parameters are sharded over the processes (FSDP2 DTensors).
        balancer: Routing, load-balancing loss and router-bias updates.
        identity: The starting model's identity (``checkpoints.model_identity``).
        history: One record per optimiser step.
        evaluations: One record per held-out evaluation.
    """

    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: WindowBatchSampler
    plan: TrainingPlan
    guard: AnchorGuard
    experts: list[nn.Parameter]
    trainable: set[str]
    total: int
    steps_per_epoch: int
    tokenizer: Any
    sharded: bool = False
    balancer: Any = None
    identity: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        """The model without Fabric's wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model


class TrainingLoop:
    """Runs a ``TrainRun`` to its last step.

    Args:
        fabric: The run's Lightning Fabric.
        config: The training parameters.
        run: What was set up.
        clip: Clips the gradients (``FabricTrainingMixin.clip_gradients_if_needed``).
        on_step: Called after every optimiser step with the position reached.
    """

    def __init__(
        self,
        fabric: Any,
        config: TrainingConfig,
        run: TrainRun,
        clip: Callable[[Any, Any], None],
        on_step: Callable[[Position], None],
    ) -> None:
        self.fabric, self.config, self.run, self.clip, self.on_step = (
            fabric,
            config,
            run,
            clip,
            on_step,
        )

    def train(self, position: Position) -> None:
        """Train from ``position`` until ``run.total`` optimiser steps are done."""
        run, accumulate = self.run, self.config.accumulate_grad_batches
        step, epoch, skip = position["step"], position["epoch"], position["skip"]
        run.model.train()
        bar = progress(
            total=run.total,
            initial=step,
            desc=f"moe_ct_training ({self.config.stage})",
            enabled=self.fabric.is_global_zero,
            dynamic_ncols=True,
        )
        while step < run.total:
            run.sampler.set_epoch(epoch, skip)
            micro, stats, started = skip, StepStats(run.plan), time.perf_counter()
            for batch in run.loader:
                micro += 1
                coef = self._aux_coefficient(step)
                if self._accumulate(batch, coef, stats, last=micro % accumulate == 0):
                    continue
                self._optimizer_step(step)
                step += 1
                lr = float(run.optimizer.param_groups[0]["lr"])
                record = stats.finish(self.fabric, step, coef, lr, time.perf_counter() - started)
                run.balancer.after_step(step - 1, stats.routing.counts, record)
                self._report(record, bar)
                done_epoch = micro >= run.steps_per_epoch * accumulate
                self.on_step(
                    {"step": step, "epoch": epoch + done_epoch, "skip": 0 if done_epoch else micro}
                )
                stats, started = StepStats(run.plan), time.perf_counter()
                if step >= run.total or done_epoch:
                    break
            epoch, skip = epoch + 1, 0
        bar.close()

    def _aux_coefficient(self, step: int) -> float:
        """The load-balancing loss's weight at ``step`` (0 when ``balancing`` leaves it out)."""
        if not uses_aux_loss(self.config):
            return 0.0
        return aux_loss_coefficient(
            step, self.config.router_aux_loss_coef, self.config.aux_loss_ramp_steps
        )

    def _accumulate(self, batch: torch.Tensor, coef: float, stats: StepStats, last: bool) -> bool:
        """Forward and backward of one micro-batch; True while the step still accumulates."""
        model = self.run.model
        with self.fabric.no_backward_sync(model, enabled=not last):
            loss = self._forward(batch, coef, stats)
            self.fabric.backward(loss / self.config.accumulate_grad_batches)
        return not last

    def _forward(self, batch: torch.Tensor, coef: float, stats: StepStats) -> torch.Tensor:
        balancer = self.run.balancer
        out = self.run.model(
            input_ids=batch, labels=batch, use_cache=False, **balancer.forward_kwargs
        )
        logits, selected = balancer.routing(out)
        aux = balancer.aux_loss(out, logits, selected)
        loss = out.loss
        if aux is not None and coef:
            loss = loss + coef * aux.to(loss.device)
        z = None
        if self.config.router_z_loss_coef:
            z = router_z_loss(logits)
            loss = loss + self.config.router_z_loss_coef * z.to(loss.device)
        losses = {"loss": loss, "lm_loss": out.loss, "aux_loss": aux, "z_loss": z}
        stats.add(losses, batch.numel(), logits, selected)
        return loss

    def _optimizer_step(self, step: int) -> None:
        """One update from the accumulated gradients; anchors come back unchanged."""
        run, config = self.run, self.config
        if config.stage == "router_then_experts" and step < config.router_warmup_steps:
            for param in run.experts:  # router warm-up: experts get no update
                param.grad = None
        run.guard.zero_grads(run.module)
        if config.gradient_clip_val:
            self.clip(run.model, run.optimizer)
        before = scheduler_steps_before_optimizer(run.scheduler)
        if before:
            run.scheduler.step()
        run.optimizer.step()
        if run.scheduler is not None and not before:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.guard.restore(run.module)

    def _report(self, record: dict[str, Any], bar: Any) -> None:
        self.run.history.append(record)
        send_to_loggers(self.fabric, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if record["step"] % self.config.log_every == 0 or record["step"] == 1:
            log_line(record)
