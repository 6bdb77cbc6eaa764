"""The optimiser and learning-rate schedule of ``moe_ct_training``, from its config."""

from __future__ import annotations

from typing import Any

import torch
from fusion_bench.optim.lr_scheduler import CosineDecayWithWarmup
from fusion_bench.utils import instantiate
from torch import nn

from .config import TrainingConfig


def build_optimizer(config: TrainingConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``config.optimizer`` instantiated with ``params``; default AdamW without weight decay."""
    if config.optimizer is None:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    return instantiate(dict(config.optimizer), params)


def build_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """The LR schedule over ``total`` optimiser steps (None: constant).

    The default is FusionBench's ``CosineDecayWithWarmup``; its warm-up starts from
    ``learning_rate / (warmup_steps + 1)`` rather than 0, so that no step is wasted at rate 0.
    """
    if config.lr_scheduler == "constant":
        return None
    if config.lr_scheduler is None:
        return CosineDecayWithWarmup(
            optimizer,
            T_max=total,
            max_lr=config.learning_rate,
            min_lr=config.min_learning_rate,
            init_lr=config.learning_rate / (config.warmup_steps + 1),
            warmup_steps=config.warmup_steps,
        )
    settings = {k: (total if v == "_T_max_" else v) for k, v in config.lr_scheduler.items()}
    return instantiate(settings, optimizer=optimizer)


def scheduler_steps_before_optimizer(scheduler: Any) -> bool:
    """FusionBench's schedulers set the rate of the coming step; torch's advance after it."""
    return scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
