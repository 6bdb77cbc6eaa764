"""Resuming ``moe_ct_training`` from a step checkpoint (written by ``checkpoints``).

Every refusal is one line naming the checkpoint, what is wrong and what to do: an
incomplete or foreign directory, a corrupt manifest or tensor file, another stage, strategy
or global batch, another starting model (the hash of its frozen tensors differs).

Another process count is fine (W -> W'): each process reads its rows of every saved tensor
from the shards that hold them (``io.sliced.rows_across``), and ``skip`` (micro-batches used
per process) is rescaled; with processes x accumulation unchanged every optimiser step sees
the same windows (``sampler.WindowBatchSampler``).
"""

from __future__ import annotations

import json
import logging
import random
import struct
from pathlib import Path
from typing import Any

import torch

from ..io.sliced import Entry, read_header, read_rows, rows_across
from .checkpoints import (
    FORMAT,
    MANIFEST,
    inner_optimizer,
    layout,
    router_biases,
    trainable_params,
)
from .config import TrainingConfig
from .loop import Position, TrainRun
from .sharding import like, local, local_rows

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
    now, saved = layout(fabric, config, run), manifest["layout"]
    # another process count is fine when every optimiser step still sees the same windows
    # (both samplers): same micro-batch size, processes x accumulation and data mixture
    keep = ("stage", "balancing", "batch_size", "sharded", "data")
    differs = {k: (saved.get(k), now[k]) for k in keep if saved.get(k) != now[k]}
    if global_micro_batches(saved) != global_micro_batches(now):
        differs["processes x accumulate_grad_batches"] = (
            global_micro_batches(saved),
            global_micro_batches(now),
        )
    if differs:
        raise ValueError(
            f"ckpt_path={directory} was written with another stage, strategy, global batch or data "
            f"mixture (checkpoint, now): {differs}; resume with the same stage, strategy, "
            "batch_size and train_sources, "
            "and processes x accumulate_grad_batches unchanged (e.g. 2 processes -> 1 with "
            "accumulate_grad_batches doubled)."
        )
    saved, current = manifest["model"], run.identity
    if saved.get("frozen_sha256") != current.get("frozen_sha256"):
        raise ValueError(
            f"ckpt_path={directory} continues training of another model: it was written for "
            f"{saved.get('path') or '?'} (files {saved.get('file_sizes')}), but the pool's "
            f"_pretrained_ is {current.get('path') or '?'} (files {current.get('file_sizes')}) "
            "and its frozen weights differ; resume with the model the run started from."
        )


def global_micro_batches(layout: dict[str, Any]) -> int:
    """Micro-batches per optimiser step over all processes."""
    return int(layout["world_size"]) * int(layout["accumulate_grad_batches"])


def _headers(directory: Path, kind: str, saved: dict[str, Any]) -> list[dict[str, Entry]]:
    """The headers of the ``kind`` files, one per process that wrote a shard (or one)."""
    names = [f"{kind}.safetensors"]
    if saved["sharded"]:
        names = [f"{kind}-rank{r}.safetensors" for r in range(int(saved["world_size"]))]
    headers = []
    for name in names:
        try:
            headers.append(read_header(directory / name))
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise ValueError(
                f"ckpt_path={directory}: {name} is missing, truncated or corrupt ({err}); "
                "resume from another step checkpoint."
            ) from err
    return headers


def _value(headers: list[dict[str, Entry]], name: str, like_param: torch.Tensor) -> torch.Tensor:
    """This process's rows of saved tensor ``name`` (its shards joined as needed)."""
    parts = [h[name] for h in headers]
    if not parts[0].shape:  # a scalar (AdamW's step), the same in every shard
        return read_rows(parts[0])
    data, start = local_rows(like_param)
    return rows_across(parts, start, start + data.shape[0])


@torch.no_grad()
def _load_tensors(fabric: Any, run: TrainRun, directory: Path, saved: dict[str, Any]) -> None:
    params = _headers(directory, "trainable", saved)
    states = _headers(directory, "optimizer", saved)
    optimizer = inner_optimizer(run)
    trainable = trainable_params(run)
    biases = router_biases(run)
    missing = sorted((set(trainable) | set(biases)) - set(params[0]))
    if missing:
        raise ValueError(
            f"ckpt_path={directory} lacks trainable parameters {missing[:3]}: it was written "
            "for another stage or model; resume with the settings it was written with."
        )
    for name, bias in biases.items():
        bias.copy_(read_rows(params[0][name]))
    for name, param in trainable.items():
        local(param.data).copy_(_value(params, name, param.data))
        prefix = f"{name}::"
        state = {
            k[len(prefix) :]: _value(states, k, param.data)
            for k in states[0]
            if k.startswith(prefix)
        }
        if state:
            optimizer.state[param] = {
                k: like(param, v.to(local(param).device)) for k, v in state.items()
            }


def restore(fabric: Any, config: TrainingConfig, run: TrainRun) -> Position:
    """Restore the state of ``config.ckpt_path`` into ``run``; return its position."""
    directory = Path(config.ckpt_path)
    manifest = read_manifest(directory)
    _check_compatible(fabric, config, run, manifest)
    written = manifest["layout"]
    _load_tensors(fabric, run, directory, written)
    for group, saved in zip(
        inner_optimizer(run).param_groups, manifest["param_groups"], strict=True
    ):
        group.update(saved)
    if run.scheduler is not None and manifest["scheduler"] is not None:
        if hasattr(run.scheduler, "load_state_dict"):
            run.scheduler.load_state_dict(manifest["scheduler"])
        else:
            vars(run.scheduler).update(manifest["scheduler"])
    rng_file = directory / f"rng-rank{fabric.global_rank}.json"
    if not rng_file.is_file():  # more processes than wrote it; training draws no numbers
        rng_file = directory / "rng-rank0.json"
    rng = json.loads(rng_file.read_text())
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    run.history[:] = manifest["history"]
    run.evaluations[:] = manifest["evaluations"]
    if fabric.is_global_zero:
        log.info("Resumed from %s at step %d", directory, manifest["position"]["step"])
    position = {k: int(manifest["position"][k]) for k in ("step", "epoch", "skip")}
    # micro-batches this process used in the epoch, for the new process count
    position["skip"] = position["skip"] * int(written["world_size"]) // fabric.world_size
    return position
