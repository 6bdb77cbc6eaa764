"""Write MoE checkpoints atomically: a temp directory beside the target, then one rename.

A temporary is named ``.NAME.tmp-PID-XXXXXXXX`` and locked (``flock``) while its process lives,
so the next run into the same folder removes what a killed process left there (for any NAME)
and never touches a live one's. An overwrite swaps the new directory with the old in one step
where Linux can (``renameat2``), so the target is never absent; elsewhere the old one is first
renamed aside (``.NAME.old-PID-XXXXXXXX``).
Files and directories get the modes the umask gives, as files written by ``open`` do
(transformers 5 writes ``model.safetensors`` 0600 through a temporary file).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..arch import legacy_config_fields

try:
    import fcntl
except ImportError:  # not POSIX: liveness by process id alone
    fcntl = None

log = logging.getLogger(__name__)

#: Tokenizer classes that only transformers 5 knows, and the class 4.x loads the same files as.
V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def check_destination(
    directory: str | os.PathLike,
    overwrite: bool,
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Fail early (before any work) if ``directory`` cannot receive a checkpoint.

    Args:
        directory: The target directory.
        overwrite: Whether a non-empty target may be replaced.
        inputs: Directories this run reads, by name (base, sources, tokenizer): the target
            may neither be nor contain one of them.

    Raises:
        FileExistsError: If it exists, is not empty, and ``overwrite`` is false.
        ValueError: If it is or contains one of ``inputs``.
        NotADirectoryError: If a path component is a file.
        PermissionError: If the final rename (or removing a replaced directory) would fail.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_checkpoint={target} exists and is not a directory.")
    _check_not_an_input(target, inputs or {})
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
    if target.is_dir():
        _check_replaceable(target)
    return target


def _check_not_an_input(target: Path, inputs: Mapping[str, str | os.PathLike]) -> None:
    real = target.resolve()
    for name, path in inputs.items():
        source = Path(path).expanduser().resolve()
        if source == real or real in source.parents:
            relation = "is" if source == real else "contains"
            raise ValueError(
                f"save_checkpoint={target} {relation} the directory of '{name}' ({source}), "
                "which this run reads; writing there would replace it. Choose another directory."
            )


def _check_replaceable(target: Path) -> None:
    """What moving an existing ``target`` aside and deleting it needs, checked up front."""
    if os.path.ismount(target):
        raise PermissionError(
            f"save_checkpoint={target} is a mount point, which cannot be replaced by a rename; "
            "choose a directory inside it."
        )
    parent = target.parent.stat()
    if parent.st_mode & stat.S_ISVTX and os.geteuid() not in (0, parent.st_uid):
        if target.stat().st_uid != os.geteuid():
            raise PermissionError(
                f"save_checkpoint={target} belongs to another user in the sticky directory "
                f"{target.parent}, so it cannot be replaced; choose another directory."
            )
    if not any(target.iterdir()):
        return  # an empty directory is renamed aside and removed: its parent suffices
    for root, _, _ in os.walk(target):
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(
                f"save_checkpoint={target}: {root} is not writable, so the directory cannot "
                "be replaced; make it writable (chmod -R u+w) or choose another directory."
            )


def add_legacy_config_fields(config_json: Path) -> None:
    """Make a config.json written by transformers 5 loadable by transformers 4 as well."""
    config = json.loads(config_json.read_text())
    extra = legacy_config_fields(config)
    if extra:
        config_json.write_text(json.dumps({**config, **extra}, indent=2, sort_keys=True) + "\n")


def portable_tokenizer_config(directory: Path) -> None:
    """Name a tokenizer class both transformers majors know in ``tokenizer_config.json``
    (transformers 5 writes ``TokenizersBackend``, which 4.x cannot load)."""
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return
    config = json.loads(file.read_text())
    portable = V5_ONLY_TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
    if portable is not None:
        config["tokenizer_class"] = portable
        file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def make_portable(directory: Path) -> None:
    """The config and tokenizer files of a checkpoint, readable by transformers 4 and 5."""
    add_legacy_config_fields(directory / "config.json")
    portable_tokenizer_config(directory)


# -- temporaries ------------------------------------------------------------------------------

_TEMP_KINDS = ("tmp", "old")


def _temporary_path(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _temporary_owner(target: Path, entry: Path) -> int | None:
    """The process id in the name of a temporary beside ``target``: any checkpoint's
    (``.NAME.tmp-PID-XXXXXXXX``), or 0 for ``target``'s own from older versions (no process
    id); None for other names."""
    kinds = "|".join(_TEMP_KINDS)
    match = re.fullmatch(rf"\..+\.(?:{kinds})-(\d+)-[0-9a-f]{{8}}", entry.name)
    if match is not None:
        return int(match.group(1))
    own = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:{kinds})-\w+", entry.name)
    return 0 if own is not None else None


def _lock(path: Path) -> int | None:
    """An exclusive lock on a directory (the open descriptor), or None when another process
    holds it. Without ``fcntl`` the descriptor is returned unlocked."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no locks on this file system: liveness by process id alone
        pass
    return fd


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_temporaries(target: Path) -> None:
    """Remove the temporaries that dead processes left in ``target``'s folder, whatever
    checkpoint they were for (a killed build into another name leaves one there as well);
    name the others.

    A temporary is stale when its lock is free and the process in its name no longer runs; a
    live writer's is left alone; one of ``target`` without a process id in its name (older
    versions) is only named.
    """
    if not target.parent.is_dir():
        return
    for entry in sorted(target.parent.iterdir()):
        pid = _temporary_owner(target, entry)
        if pid is None or not entry.is_dir():
            continue
        if not pid:
            log.warning(
                "%s is the temporary of an interrupted build (or of one running now); remove "
                "it if no other build writes to %s.",
                entry,
                target,
            )
            continue
        with suppress(FileNotFoundError):  # its owner may just have finished
            _remove_if_stale(entry, pid)


def _remove_if_stale(entry: Path, pid: int) -> None:
    fd = _lock(entry)
    if fd is None or _process_alive(pid):
        log.info("Left %s alone: process %d is still writing it.", entry, pid)
        if fd is not None:
            os.close(fd)
        return
    try:
        shutil.rmtree(entry)
        log.info("Removed %s, left by process %d, which no longer runs.", entry, pid)
    except OSError as err:
        log.warning("Cannot remove %s, left by a killed build (%s); remove it.", entry, err)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``) where possible."""
    with suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every directory 0777 and every file 0666 less the umask, as ``open`` would."""
    mask = current_umask()
    for path, _, files in os.walk(root):
        for item, mode in [(path, 0o777), *((os.path.join(path, f), 0o666) for f in files)]:
            if stat.S_IMODE(os.lstat(item).st_mode) != mode & ~mask:
                os.chmod(item, mode & ~mask)


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden, locked temporary directory next to ``directory`` and move it into
    place by a rename when the block ends without error; on any error (or interruption)
    remove it, so ``directory`` is either untouched or complete. Temporaries that a killed
    process left for the same target are removed first.

    Raises:
        FileExistsError, NotADirectoryError, PermissionError: As ``check_destination``.
    """
    target = check_destination(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_temporaries(target)
    tmp = _temporary_path(target, "tmp")
    tmp.mkdir()
    fd = _lock(tmp)
    try:
        yield tmp
        apply_umask(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``. An existing ``target`` is swapped with ``tmp`` in one
    step where the system can (so it is never absent), else renamed aside first; either way
    within its directory (no write permission on it needed), and removed afterwards."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):
        old = tmp  # now holds the replaced checkpoint
    else:
        old = _temporary_path(target, "old")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
    try:
        shutil.rmtree(old)
    except OSError as err:
        log.warning("Replaced %s but cannot remove its old version %s (%s).", target, old, err)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (a reader sees the old file or the new)."""
    tmp = _temporary_path(path, "tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_extra_files(directory: Path, files: dict[str, str | bytes] | None) -> None:
    """Write ``files`` (name -> text or bytes) into ``directory`` (a checkpoint's temporary
    directory, so that they appear with the model in the same rename)."""
    for name, content in (files or {}).items():
        if isinstance(content, bytes):
            (directory / name).write_bytes(content)
        else:
            (directory / name).write_text(content)


def save_checkpoint(
    model: Any,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    overwrite: bool = False,
    extra_files: dict[str, str | bytes] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and ``tokenizer``, and ``extra_files`` name -> text or bytes) as a Hugging Face
    directory, all or nothing. ``state_dict`` replaces the model's own (e.g. the full
    weights gathered from FSDP shards).

    The checkpoint is written to a hidden temporary directory next to the target and moved
    into place by a rename, so an error or interruption never leaves a partial checkpoint.
    """
    with atomic_directory(directory, overwrite) as tmp:
        model.save_pretrained(
            tmp, safe_serialization=True, max_shard_size="2GB", state_dict=state_dict
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        write_extra_files(tmp, extra_files)
    target = Path(directory).expanduser().absolute()
    log.info("Saved MoE checkpoint to %s", target)
    return target
