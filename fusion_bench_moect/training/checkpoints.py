"""Step checkpoints and the final save of ``moe_ct_training`` (reading them back: ``resume``).

A step checkpoint (``step-NNNNNN/``) holds only what training changed and what resuming
needs: the trainable parameters (``trainable*.safetensors``), their optimiser state
(``optimizer*.safetensors``), and in ``trainer_state.json`` the position in the data, the
schedule, the optimiser's hyper-parameters, the history and the starting model's identity;
each rank's RNG state goes to ``rng-rank{r}.json``. The frozen weights (anchors, attention,
embeddings: most of the model) are the starting checkpoint's and are not copied; its identity
(a hash of the frozen tensors) is checked on resume. Under FSDP2 every rank writes its own
shards (``-rank{r}``). No pickle: safetensors and JSON only, so nothing a scheduler computes
with numpy can make a checkpoint unloadable.

A step directory is written under a temporary name and renamed when complete
(``io.checkpoint.atomic_directory``); ``keep_last`` prunes older steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..io.checkpoint import atomic_directory, clear_stale_temporaries
from ..io.checkpoint import save_checkpoint as write_checkpoint
from ..io.sliced import is_checkpoint
from ..progress import progress
from .card import card_file
from .config import TrainingConfig
from .export import save_streamed
from .loop import Position, TrainRun
from .plots import HISTORY_PLOT, plot_training_history
from .sharding import full_state_dict, local

log = logging.getLogger(__name__)

MANIFEST = "trainer_state.json"
"""Position, layout, schedule, history and model identity of a step checkpoint."""
FORMAT = 2


def model_identity(
    model: nn.Module,
    trainable: set[str],
    read: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The starting model's path, checkpoint file sizes and a hash of its frozen tensors
    (``read(name, tensor)``: the values of a tensor the model does not hold yet)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name in trainable:
            continue
        tensor = read(name, tensor) if read is not None else tensor
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    path = str(getattr(model, "name_or_path", "") or "")
    files = Path(path).glob("*.safetensors") if path and Path(path).is_dir() else []
    return {
        "path": path,
        "frozen_sha256": digest.hexdigest(),
        "file_sizes": {f.name: f.stat().st_size for f in sorted(files)},
    }


def checkpoint_root(config: TrainingConfig) -> Path:
    """Where step checkpoints go: ``checkpoint_dir`` or ``<save_checkpoint>-checkpoints``."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir).expanduser().absolute()
    if config.save_checkpoint:
        target = Path(config.save_checkpoint).expanduser().absolute()
        return target.with_name(target.name + "-checkpoints")
    raise ValueError("checkpoint_every needs checkpoint_dir or save_checkpoint.")


def history_json(run: TrainRun) -> str:
    plan = getattr(run.sampler, "plan", {})  # the data plan (tokens, shares, epochs per source)
    return json.dumps({"train": run.history, "eval": run.evaluations, "data_plan": plan}, indent=1)


def save_model(fabric: Any, run: TrainRun, directory: Path, title: str) -> None:
    """The whole model as a Hugging Face directory, rank 0 writing, with its history, the
    history plot (``title``) and the card, all in the same rename. Started from a checkpoint
    directory: tensor by tensor, frozen ones copied from it (``export``); a model given as an
    object: its state dict (FSDP2 shards gathered on rank 0)."""
    extra: dict[str, str | bytes] = {}
    if fabric.is_global_zero:
        plot = io.BytesIO()
        plot_training_history(run.history, run.evaluations, plot, title=title)
        extra = {"training_history.json": history_json(run), HISTORY_PLOT: plot.getvalue(),
                 **card_file(run, directory)}  # fmt: skip
    module = run.module
    if is_checkpoint(str(getattr(module, "name_or_path", "") or "")):
        save_streamed(fabric, module, run.trainable, directory, run.tokenizer, extra)
    else:
        state_dict = full_state_dict(module) if run.sharded else None
        if fabric.is_global_zero:
            write_checkpoint(
                module,
                directory,
                run.tokenizer,
                overwrite=True,
                extra_files=extra,
                state_dict=state_dict,
            )
    fabric.barrier()


def layout(fabric: Any, config: TrainingConfig, run: TrainRun) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint."""
    return {
        "world_size": fabric.world_size,
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "batch_size": config.batch_size,
        "sharded": run.sharded,
        "stage": config.stage,
        "balancing": config.balancing,
        "data": {
            n: [r["windows"], r["share"]] for n, r in getattr(run.sampler, "plan", {}).items()
        },
    }


def rank_suffix(fabric: Any, run: TrainRun) -> str:
    """``-rank{r}`` for the per-rank files of a sharded run, else nothing."""
    return f"-rank{fabric.global_rank}" if run.sharded else ""


def inner_optimizer(run: TrainRun) -> torch.optim.Optimizer:
    """The torch optimiser inside Fabric's wrapper."""
    return getattr(run.optimizer, "optimizer", run.optimizer)


def trainable_params(run: TrainRun) -> dict[str, nn.Parameter]:
    """The parameters this stage trains, by name."""
    return {n: p for n, p in run.module.named_parameters() if n in run.trainable}


def _tensors(run: TrainRun) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's parts of the trainable parameters and of their optimiser state, and the
    router biases that bias balancing updates (buffers, replicated on every rank)."""
    params = {n: b.detach().contiguous().cpu() for n, b in router_biases(run).items()}
    states = {}
    optimizer = inner_optimizer(run)
    for name, param in trainable_params(run).items():
        params[name] = local(param.detach()).contiguous().cpu()
        for key, value in optimizer.state.get(param, {}).items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} of {name} is not a tensor: {value!r}")
            states[f"{name}::{key}"] = local(value).contiguous().cpu()
    return params, states


def router_biases(run: TrainRun) -> dict[str, torch.Tensor]:
    """The router biases that bias balancing updates (empty without it)."""
    return run.balancer.named_biases() if run.balancer is not None else {}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    if hasattr(scheduler, "state_dict"):
        return scheduler.state_dict()
    # FusionBench's warm-up schedulers are plain objects: their state is their attributes
    return {k: v for k, v in vars(scheduler).items() if k != "optimizer"}


def _write_files(fabric: Any, run: TrainRun, directory: Path) -> None:
    """This rank's files; rank 0's only when nothing is sharded (every rank holds the same)."""
    if not (run.sharded or fabric.is_global_zero):
        (directory / f"rng-rank{fabric.global_rank}.json").write_text(json.dumps(_rng_state()))
        return
    params, states = _tensors(run)
    suffix = rank_suffix(fabric, run)
    jobs = [(f"trainable{suffix}.safetensors", params), (f"optimizer{suffix}.safetensors", states)]
    # a bar only when writing takes more than a few seconds
    for name, tensors in progress(
        jobs, enabled=fabric.is_global_zero, desc="step checkpoint", delay=3
    ):
        save_file(tensors, str(directory / name))
    (directory / f"rng-rank{fabric.global_rank}.json").write_text(json.dumps(_rng_state()))


def _manifest(fabric: Any, config: TrainingConfig, run: TrainRun, position: Position) -> dict:
    groups = [
        {k: v for k, v in g.items() if k != "params"} for g in inner_optimizer(run).param_groups
    ]
    return {
        "format": FORMAT,
        "position": position,
        "layout": layout(fabric, config, run),
        "model": run.identity,
        "scheduler": _scheduler_state(run.scheduler),
        "param_groups": groups,
        "history": run.history,
        "evaluations": run.evaluations,
    }


def save_step(fabric: Any, config: TrainingConfig, run: TrainRun, position: Position) -> Path:
    """A resumable step checkpoint at ``position``, all or nothing; prune to ``keep_last``."""
    root = checkpoint_root(config)
    target = root / f"step-{position['step']:06d}"
    with ExitStack() as stack:
        tmp = None
        if fabric.is_global_zero:
            tmp = str(stack.enter_context(atomic_directory(target, overwrite=True)))
        tmp = Path(fabric.broadcast(tmp))
        _write_files(fabric, run, tmp)
        fabric.barrier()
        if fabric.is_global_zero:  # written last, inside the temporary directory
            (tmp / MANIFEST).write_text(json.dumps(_manifest(fabric, config, run, position)))
    if fabric.is_global_zero:
        prune(root, config.keep_last)
        log.info("Step checkpoint at step %d: %s", position["step"], target)
    fabric.barrier()
    return target


def clear_stale(root: Path) -> None:
    """Remove the temporaries of step checkpoints whose writer was killed (never a live one's).
    One pass over ``root``: ``clear_stale_temporaries`` takes every dead writer's, any name."""
    stale = sorted(root.glob(".step-*.tmp-*")) if root.is_dir() else []
    if stale:
        clear_stale_temporaries(root / stale[0].name[1:].split(".tmp-")[0])


def prune(root: Path, keep_last: int | None) -> None:
    """Remove all but the newest ``keep_last`` step directories (None: keep all)."""
    if keep_last is None:
        return
    steps = sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
