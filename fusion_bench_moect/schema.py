"""Parameter schemas: one frozen dataclass per algorithm, every other listing generated from it.

A schema field carries its default, a one-line doc, a check (returns the normalised value or
raises ValueError naming the parameter) and, for the lean CLI, its option. From the dataclass
come the algorithm's signature and ``Args:`` docstring, its method YAML and the parameter table
of its docs page. ``params.MoECTConfig`` (the build) and ``training.config.TrainingConfig``
(continual training) are the two schemas. No torch import: CLIs parse options before anything
heavy loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any

Check = Callable[[str, Any], Any]


def param(default: Any, doc: str, *, check: Check | None = None, yaml: str | None = None, **cli):
    """A schema field: default, one-line doc, check and the lean CLI's option (``flag``,
    ``parse``, ``choices``, ``nargs``, ``help`` in place of the doc; ``flag=None``: not an
    option there). ``yaml`` replaces
    the default in the method YAML (an example value, e.g. a nested mapping)."""
    return field(default=default, metadata={"doc": doc, "check": check, "cli": cli, "yaml": yaml})


def check_int(
    low: int | None = None, optional: bool = False, unlimited: int | None = None
) -> Check:
    """An integer >= ``low``; ``optional``: null allowed; ``unlimited``: one more allowed value
    below ``low`` that means "no limit" (e.g. -1)."""

    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
            value = int(value)
        if unlimited is not None and value == unlimited:
            return value
        if low is not None and value < low:
            also = f" (or {unlimited} for no limit)" if unlimited is not None else ""
            raise ValueError(f"{name} must be >= {low}{also}, got {value}.")
        return value

    return check


def check_float(
    low: float,
    high: float = math.inf,
    *,
    high_open: bool = False,
    low_open: bool = False,
    optional: bool = False,
) -> Check:
    """A finite number in [low, high] (either end open on request); ``optional``: null allowed."""

    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}.")
        value = float(value)
        above = low < value if low_open else low <= value
        below = value < high if high_open or math.isinf(high) else value <= high
        if not (math.isfinite(value) and above and below):
            left = "(" if low_open else "["
            right = ")" if high_open or math.isinf(high) else "]"
            raise ValueError(f"{name} must lie in {left}{low:g}, {high:g}{right}, got {value}.")
        return value

    return check


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


def check_choice(choices: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"Unknown {name} {value!r}; valid: {', '.join(map(str, choices))}.")
        return value

    return check


def expand_path(value: str) -> str:
    """``~`` and ``$VARIABLES`` expanded, as users expect of a path written in YAML or on a
    command line (where no shell expanded it)."""
    return os.path.expandvars(os.path.expanduser(value))


def check_optional_path(name: str, value: Any) -> str | None:
    """A path or null; the path with ``~`` and ``$VARIABLES`` expanded, once, here, so that
    every reader of the parameter gets the same directory."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path or null, got {value!r}.")
    return expand_path(value)


def run_checks(instance: Any) -> None:
    """Normalise every field of a frozen schema instance through its check (``__post_init__``)."""
    for f in dataclasses.fields(instance):
        check = f.metadata["check"]
        if check is not None:
            object.__setattr__(instance, f.name, check(f.name, getattr(instance, f.name)))


def plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts and lists (JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def signature(schema: type) -> inspect.Signature:
    """``(self, *, <every parameter with its default>, **kwargs)``: an algorithm's signature."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(schema):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def args_docstring(schema: type, indent: str = "    ") -> str:
    """The Google-style ``Args:`` section of an algorithm generated from its schema."""
    lines = [f"{indent}Args:"]
    for f in dataclasses.fields(schema):
        lines.append(
            f"{indent}    {f.name}: {f.metadata['doc']} (default {yaml_value(f.default)})."
        )
    return "\n".join(lines) + "\n"


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def yaml_lines(schema: type, width: int = 27) -> list[str]:
    """``name: default  # doc`` per parameter (a field's ``yaml`` example in place of its
    default; a multi-line example goes below the key)."""
    lines = []
    for f in dataclasses.fields(schema):
        example = f.metadata.get("yaml")
        value = yaml_value(f.default) if example is None else example
        first, *rest = value.split("\n")
        lines.append(f"{f.name}: {first}".rstrip().ljust(width - 1) + f" # {f.metadata['doc']}")
        lines += rest
    return lines


def method_yaml(schema: type, target: str, title: str, notes: Sequence[str], width: int) -> str:
    """A method's YAML: FusionBench's banner (``title``, ``notes``), ``_target_`` and every
    parameter with its default and doc."""
    rule = "# " + "=" * 77
    banner = [rule, f"# FusionBench Method Configuration: {title}", rule]
    banner += [f"# {line}" for line in notes] + [rule, f"_target_: {target}"]
    return "\n".join(banner + yaml_lines(schema, width)) + "\n"


def markdown_table(schema: type) -> str:
    """The Markdown parameter table of an algorithm's docs page."""
    rows = ["| parameter | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(schema):
        default = yaml_value(f.default)
        if isinstance(f.default, str):
            default = f"`{default}`"
        rows.append(f"| `{f.name}` | {default} | {f.metadata['doc'].replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
