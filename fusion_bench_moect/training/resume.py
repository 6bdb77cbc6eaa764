"""Resuming ``moe_ct_training`` from a step checkpoint (written by ``checkpoints``).

Every refusal is one line naming the checkpoint, what is wrong and what to do: an
incomplete or foreign directory, a corrupt manifest or tensor file, another stage or
parallel layout, another starting model (the hash of its frozen tensors differs).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoints import (
    FORMAT,
    MANIFEST,
    inner_optimizer,
    layout,
    rank_suffix,
    router_biases,
    trainable_params,
)
from .config import TrainingConfig
from .loop import Position, TrainRun
from .sharding import like, local

log = logging.getLogger(__name__)


def read_manifest(ckpt_path: str | Path) -> dict[str, Any]:
    """The manifest of a step checkpoint, or a one-line error naming what is wrong."""
    directory = Path(ckpt_path)
    path = directory / MANIFEST
    if not directory.exists():
        raise FileNotFoundError(
            f"ckpt_path={directory} does not exist; give a step-NNNNNN directory under "
            "checkpoint_dir."
        )
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
    now = layout(fabric, config, run)
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
    suffix = rank_suffix(fabric, run)
    params = _load_file(directory, f"trainable{suffix}.safetensors")
    states = _load_file(directory, f"optimizer{suffix}.safetensors")
    optimizer = inner_optimizer(run)
    trainable = trainable_params(run)
    biases = router_biases(run)
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


def restore(fabric: Any, config: TrainingConfig, run: TrainRun) -> Position:
    """Restore the state of ``config.ckpt_path`` into ``run``; return its position."""
    directory = Path(config.ckpt_path)
    manifest = read_manifest(directory)
    _check_compatible(fabric, config, run, manifest)
    _load_tensors(fabric, run, directory)
    for group, saved in zip(
        inner_optimizer(run).param_groups, manifest["param_groups"], strict=True
    ):
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
