"""Small helpers for values that arrive from Hydra/OmegaConf."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(value: Any) -> Any:
    """OmegaConf containers to plain Python (resolved); other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
