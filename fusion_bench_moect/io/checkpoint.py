"""Write MoE checkpoints atomically: a temp directory beside the target, then one rename."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def check_destination(directory: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if ``directory`` cannot receive a checkpoint.

    Raises:
        FileExistsError: If it exists, is not empty, and ``overwrite`` is false.
        NotADirectoryError: If a path component is a file.
        PermissionError: If its parent cannot be written.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_checkpoint={target} exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"save_checkpoint={target} is not empty; choose a new directory or set "
            "overwrite: true to replace it."
        )
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            f"save_checkpoint={target}: cannot write in {parent}: it is a file; choose a "
            "directory path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"save_checkpoint={target}: cannot write in {parent}; choose a writable directory."
        )
    return target


def add_legacy_config_fields(config_json: Path) -> None:
    """Make a config.json written by transformers 5 loadable by transformers 4 as well."""
    from ..arch import legacy_config_fields

    config = json.loads(config_json.read_text())
    extra = legacy_config_fields(config)
    if extra:
        config_json.write_text(json.dumps({**config, **extra}, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary directory next to ``directory`` and move it into place by a
    rename when the block ends without error; on any error (or interruption) remove it, so
    ``directory`` is either untouched or complete.

    Raises:
        FileExistsError, NotADirectoryError, PermissionError: As ``check_destination``.
    """
    target = check_destination(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    model: Any,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and ``tokenizer``, and ``extra_files`` name -> text) as a Hugging Face
    directory, all or nothing. ``state_dict`` replaces the model's own (e.g. the full
    weights gathered from FSDP shards).

    The checkpoint is written to a hidden temporary directory next to the target and moved
    into place by a rename, so an error or interruption never leaves a partial checkpoint.
    """
    with atomic_directory(directory, overwrite) as tmp:
        model.save_pretrained(
            tmp, safe_serialization=True, max_shard_size="2GB", state_dict=state_dict
        )
        add_legacy_config_fields(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    target = Path(directory).expanduser().absolute()
    log.info("Saved MoE checkpoint to %s", target)
    return target
