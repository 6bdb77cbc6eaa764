"""Step checkpoints, resume and the final save of ``moe_ct_training``.

A step checkpoint (``step-NNNNNN/``) holds the model, the optimiser, the schedule, the
position in the data, the history and every rank's RNG state; ``trainer_state.json`` is
written last, so a directory without it is incomplete. ``resume`` restores all of it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import save_checkpoint as write_checkpoint
from .config import TrainingConfig
from .loop import Position, TrainRun

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.ckpt"
"""Optimiser, scheduler, step and trainable weights of a step checkpoint (``fabric.save``)."""
MARKER_FILE = "trainer_state.json"
"""Written last: a step checkpoint without it is incomplete."""
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_forward_module.")


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    if hasattr(scheduler, "state_dict"):
        return scheduler.state_dict()
    # FusionBench's warm-up schedulers are plain objects: their state is their attributes
    return {k: v for k, v in vars(scheduler).items() if k != "optimizer"}


def _load_scheduler_state(scheduler: Any, state: Mapping[str, Any] | None) -> None:
    if scheduler is None or state is None:
        return
    if hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(state)
    else:
        vars(scheduler).update(state)


def checkpoint_root(config: TrainingConfig) -> Path:
    """Where step checkpoints go: ``checkpoint_dir`` or ``<save_checkpoint>-checkpoints``."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir)
    if config.save_checkpoint:
        target = Path(config.save_checkpoint).expanduser().absolute()
        return target.with_name(target.name + "-checkpoints")
    raise ValueError("checkpoint_every needs checkpoint_dir or save_checkpoint.")


def history_json(run: TrainRun) -> str:
    return json.dumps({"train": run.history, "eval": run.evaluations}, indent=1)


def save_model(fabric: Any, run: TrainRun, directory: Path) -> None:
    """The whole model as a Hugging Face directory (rank 0 writes; FSDP shards gathered)."""
    state_dict = None
    if run.sharded:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        root = run.model._forward_module
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state_dict = root.state_dict()
        state_dict = {clean_name(k): v for k, v in state_dict.items()}
    if fabric.is_global_zero:
        write_checkpoint(
            run.module,
            directory,
            run.tokenizer,
            overwrite=True,
            extra_files={"training_history.json": history_json(run)},
            state_dict=state_dict,
        )
    fabric.barrier()


def _layout(fabric: Any, config: TrainingConfig) -> dict[str, int]:
    return {
        "world_size": fabric.world_size,
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "batch_size": config.batch_size,
    }


def save_step(fabric: Any, config: TrainingConfig, run: TrainRun, position: Position) -> None:
    """A resumable checkpoint at ``position``."""
    directory = checkpoint_root(config) / f"step-{position['step']:06d}"
    save_model(fabric, run, directory)
    trainer = {
        **position,
        **_layout(fabric, config),
        "scheduler": _scheduler_state(run.scheduler),
        "history": run.history,
        "evaluations": run.evaluations,
    }
    fabric.save(
        directory / STATE_FILE,
        {"model": run.model, "optimizer": run.optimizer, "trainer": trainer},
        filter=None if run.sharded else {"model": lambda k, _: k in run.trainable},
    )
    torch.save(_rng_state(), directory / f"rng-rank{fabric.global_rank}.pt")
    fabric.barrier()
    if fabric.is_global_zero:
        (directory / MARKER_FILE).write_text(json.dumps(position) + "\n")
        log.info("Resumable checkpoint at step %d: %s", position["step"], directory)
    fabric.barrier()


def check_resumable(ckpt_path: str) -> None:
    """Fail before any work when ``ckpt_path`` is not a complete step checkpoint."""
    if not (Path(ckpt_path) / MARKER_FILE).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} is not a complete moe_ct_training step checkpoint "
            f"(no {MARKER_FILE}); give a step-NNNNNN directory under checkpoint_dir."
        )


def resume(fabric: Any, config: TrainingConfig, run: TrainRun) -> Position:
    """Restore the state of ``config.ckpt_path`` into ``run``; return its position."""
    directory = Path(config.ckpt_path)
    remainder = fabric.load(
        directory / STATE_FILE, {"model": run.model, "optimizer": run.optimizer}, strict=False
    )
    trainer = remainder["trainer"]
    differs = {k: (trainer[k], v) for k, v in _layout(fabric, config).items() if trainer[k] != v}
    if differs:
        raise ValueError(
            f"ckpt_path={directory} was written with a different batch layout "
            f"(checkpoint, now): {differs}; resume with the same processes and batch."
        )
    _load_scheduler_state(run.scheduler, trainer["scheduler"])
    rng = directory / f"rng-rank{fabric.global_rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    run.history[:] = trainer["history"]
    run.evaluations[:] = trainer["evaluations"]
    if fabric.is_global_zero:
        log.info("Resumed from %s at step %d", directory, trainer["step"])
    return {k: int(trainer[k]) for k in ("step", "epoch", "skip")}
