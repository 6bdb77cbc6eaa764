"""Step checkpoints, resume and the final save of ``moe_ct_training``.

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
import json
import logging
import random
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io.checkpoint import atomic_directory, clear_stale_temporaries
from ..io.checkpoint import save_checkpoint as write_checkpoint
from ..progress import progress
from .config import TrainingConfig
from .loop import Position, TrainRun
from .sharding import full_state_dict, like, local

log = logging.getLogger(__name__)

MANIFEST = "trainer_state.json"
"""Position, layout, schedule, history and model identity of a step checkpoint."""
FORMAT = 2


def model_identity(model: nn.Module, trainable: set[str]) -> dict[str, Any]:
    """The starting model's path, checkpoint file sizes and a hash of its frozen tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in trainable:
            continue
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
    return json.dumps({"train": run.history, "eval": run.evaluations}, indent=1)


def save_model(fabric: Any, run: TrainRun, directory: Path) -> None:
    """The whole model as a Hugging Face directory (rank 0 writes; FSDP2 shards gathered)."""
    state_dict = full_state_dict(run.module) if run.sharded else None
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


# ---------------------------------------------------------------------- writing
def _layout(fabric: Any, config: TrainingConfig, run: TrainRun) -> dict[str, Any]:
    return {
        "world_size": fabric.world_size,
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "batch_size": config.batch_size,
        "sharded": run.sharded,
        "stage": config.stage,
        "balancing": config.balancing,
    }


def _suffix(fabric: Any, run: TrainRun) -> str:
    return f"-rank{fabric.global_rank}" if run.sharded else ""


def _optimizer(run: TrainRun) -> torch.optim.Optimizer:
    return getattr(run.optimizer, "optimizer", run.optimizer)


def _trainable(run: TrainRun) -> dict[str, nn.Parameter]:
    return {n: p for n, p in run.module.named_parameters() if n in run.trainable}


def _tensors(run: TrainRun) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's parts of the trainable parameters and of their optimiser state, and the
    router biases that bias balancing updates (buffers, replicated on every rank)."""
    params = {n: b.detach().contiguous().cpu() for n, b in _biases(run).items()}
    states = {}
    optimizer = _optimizer(run)
    for name, param in _trainable(run).items():
        params[name] = local(param.detach()).contiguous().cpu()
        for key, value in optimizer.state.get(param, {}).items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} of {name} is not a tensor: {value!r}")
            states[f"{name}::{key}"] = local(value).contiguous().cpu()
    return params, states


def _biases(run: TrainRun) -> dict[str, torch.Tensor]:
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
    suffix = _suffix(fabric, run)
    jobs = [(f"trainable{suffix}.safetensors", params), (f"optimizer{suffix}.safetensors", states)]
    # a bar only when writing takes more than a few seconds
    for name, tensors in progress(
        jobs, enabled=fabric.is_global_zero, desc="step checkpoint", delay=3
    ):
        save_file(tensors, str(directory / name))
    (directory / f"rng-rank{fabric.global_rank}.json").write_text(json.dumps(_rng_state()))


def _manifest(fabric: Any, config: TrainingConfig, run: TrainRun, position: Position) -> dict:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in _optimizer(run).param_groups]
    return {
        "format": FORMAT,
        "position": position,
        "layout": _layout(fabric, config, run),
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
    """Remove the temporaries of step checkpoints whose writer was killed (never a live one's)."""
    for entry in sorted(root.glob(".step-*.tmp-*")) if root.is_dir() else []:
        clear_stale_temporaries(root / entry.name[1:].split(".tmp-")[0])


def prune(root: Path, keep_last: int | None) -> None:
    """Remove all but the newest ``keep_last`` step directories (None: keep all)."""
    if keep_last is None:
        return
    steps = sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- reading
def read_manifest(ckpt_path: str | Path) -> dict[str, Any]:
    """The manifest of a step checkpoint, or a one-line error naming what is wrong."""
    directory = Path(ckpt_path)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={directory} is not a complete moe_ct_training step checkpoint (no "
            f"{MANIFEST}); give a step-NNNNNN directory under checkpoint_dir."
        )
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(
                f"format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
            )
        for key in ("position", "layout", "model", "param_groups", "history", "evaluations"):
            manifest[key]  # noqa: B018 (a KeyError names the missing part)
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(
            f"ckpt_path={directory}: {path.name} is corrupt or not a moe_ct_training step "
            f"manifest of format {FORMAT} ({err}); resume from another step checkpoint."
        ) from err
    return manifest


def _check_compatible(fabric, config: TrainingConfig, run: TrainRun, manifest: dict) -> None:
    directory = config.ckpt_path
    now = _layout(fabric, config, run)
    differs = {k: (v, now[k]) for k, v in manifest["layout"].items() if now.get(k) != v}
    if differs:
        raise ValueError(
            f"ckpt_path={directory} was written with another stage or parallel layout "
            f"(checkpoint, now): {differs}; resume with the same stage, processes, strategy "
            "and batch."
        )
    saved, current = manifest["model"], run.identity
    if saved.get("frozen_sha256") != current.get("frozen_sha256"):
        raise ValueError(
            f"ckpt_path={directory} continues training of another model: it was written for "
            f"{saved.get('path') or '?'} (files {saved.get('file_sizes')}), but the pool's "
            f"_pretrained_ is {current.get('path') or '?'} (files {current.get('file_sizes')}) "
            "and its frozen weights differ; resume with the model the run started from."
        )


def _load_file(directory: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / name))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"ckpt_path={directory}: {name} is missing, truncated or corrupt ({err}); resume "
            "from another step checkpoint."
        ) from err


@torch.no_grad()
def _load_tensors(fabric: Any, run: TrainRun, directory: Path) -> None:
    suffix = _suffix(fabric, run)
    params = _load_file(directory, f"trainable{suffix}.safetensors")
    states = _load_file(directory, f"optimizer{suffix}.safetensors")
    optimizer = _optimizer(run)
    trainable = _trainable(run)
    biases = _biases(run)
    missing = sorted((set(trainable) | set(biases)) - set(params))
    if missing:
        raise ValueError(
            f"ckpt_path={directory} lacks trainable parameters {missing[:3]}: it was written "
            "for another stage or model; resume with the settings it was written with."
        )
    for name, bias in biases.items():
        bias.copy_(params[name])
    for name, param in trainable.items():
        local(param.data).copy_(params[name])
        prefix = f"{name}::"
        state = {k[len(prefix) :]: v for k, v in states.items() if k.startswith(prefix)}
        if state:
            optimizer.state[param] = {
                k: like(param, v.to(local(param).device)) for k, v in state.items()
            }


def resume(fabric: Any, config: TrainingConfig, run: TrainRun) -> Position:
    """Restore the state of ``config.ckpt_path`` into ``run``; return its position."""
    directory = Path(config.ckpt_path)
    manifest = read_manifest(directory)
    _check_compatible(fabric, config, run, manifest)
    _load_tensors(fabric, run, directory)
    for group, saved in zip(_optimizer(run).param_groups, manifest["param_groups"], strict=True):
        group.update(saved)
    if run.scheduler is not None and manifest["scheduler"] is not None:
        if hasattr(run.scheduler, "load_state_dict"):
            run.scheduler.load_state_dict(manifest["scheduler"])
        else:
            vars(run.scheduler).update(manifest["scheduler"])
    rng = json.loads((directory / f"rng-rank{fabric.global_rank}.json").read_text())
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    run.history[:] = manifest["history"]
    run.evaluations[:] = manifest["evaluations"]
    if fabric.is_global_zero:
        log.info("Resumed from %s at step %d", directory, manifest["position"]["step"])
    return {k: int(manifest["position"][k]) for k in ("step", "epoch", "skip")}
