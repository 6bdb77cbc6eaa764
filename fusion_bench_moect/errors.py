"""The plugin's errors through ``fusion_bench``: its one-line message last, not a traceback.

A bad input makes the plugin raise ``ValueError`` or ``OSError`` with one line naming the
culprit and the fix. Through the ``fusion_bench`` CLI that line used to be buried: FusionBench
logs the exception with its traceback, then Hydra prints the traceback again. Hydra prints a
``CompactHydraException`` as its message alone, so under Hydra (and only there: the Python
API keeps the original exception types) such an error is re-raised as ``PluginError``, and a
filter on FusionBench's CLI logger drops the traceback from its log record of it. The output
then ends with the message and Hydra's hint about ``HYDRA_FULL_ERROR=1``, which still gives
the whole traceback (the original error is the ``PluginError``'s cause).

Only errors raised by the plugin's own code are shortened; anything raised inside another
library (a bug, an unforeseen failure) keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException

#: FusionBench's CLI logger, which logs a failed run's exception with its traceback.
FUSION_BENCH_CLI_LOGGER = "fusion_bench.scripts.cli"
PACKAGE_DIR = Path(__file__).resolve().parent

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(CompactHydraException):
    """A bad input reported by the plugin, shown by Hydra as its message alone."""


class _NoTracebackForPluginErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PluginError):
            record.exc_info = None
            record.exc_text = None
        return True


def raised_by_plugin(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this package."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return PACKAGE_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def under_hydra() -> bool:
    """Whether this runs inside a Hydra job (the ``fusion_bench`` CLI)."""
    return HydraConfig.initialized()


def _quiet_cli_logger() -> None:
    logger = logging.getLogger(FUSION_BENCH_CLI_LOGGER)
    if not any(isinstance(f, _NoTracebackForPluginErrors) for f in logger.filters):
        logger.addFilter(_NoTracebackForPluginErrors())


def one_line_errors(method: F) -> F:
    """Decorate an entry point that FusionBench calls (``run``, ``evaluate``): under Hydra,
    the plugin's ``ValueError`` / ``OSError`` become a ``PluginError`` with the same message."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (ValueError, OSError) as err:
            if not (under_hydra() and raised_by_plugin(err)):
                raise
            _quiet_cli_logger()
            raise PluginError(str(err)) from err

    return wrapper  # type: ignore[return-value]


def retired_preset(name: str, replacement: str, why: str = "", **_: Any) -> None:
    """The ``_target_`` of a retired config preset (a stub YAML kept under its old name):
    instantiating it fails with one line naming what replaced it."""
    if under_hydra():
        _quiet_cli_logger()
        error: type[Exception] = PluginError
    else:
        error = ValueError
    raise error(f"{name} is retired{why}; use {replacement}.")
