"""PEFT LoRA adapter directories as sources: the base plus the adapter's low-rank update.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) is read as the
dense model ``W_base + scaling * B @ A``, one FFN tensor at a time, in float32: the whole
model is never merged in memory. Only the FFN projections (gate/up/down) become expert
weights; updates of anything else (attention, embeddings, ``modules_to_save``) cannot go
into experts and are reported by name.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .sources import SourceError, TensorSource, read_json_object

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
#: Saved LoRA keys: ``base_model.model.<module>.lora_A.weight`` (adapter name stripped).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_FFN_MODULE = re.compile(r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)$")
#: Config flags of LoRA variants whose update is not ``scaling * B @ A`` on the base weight.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a bias to the update",
    "use_qalora": "QALoRA (use_qalora) works on pooled quantised inputs",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies per token",
    "layer_replication": "layer_replication changes the model's layers",
    "target_parameters": "target_parameters adapts raw parameters, not modules",
}
#: ``init_lora_weights`` values that change the base weights the adapter is trained against.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of
    the module name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _same_base(declared: str, base_path: Path | None) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` names the base: the same string or
    directory, or the same last path component (a hub id ``org/Model`` and a local copy
    ``.../Model``)."""
    if base_path is None or not declared:
        return True
    declared_path = Path(declared).expanduser()
    if declared_path.exists() and declared_path.resolve() == base_path.resolve():
        return True
    return declared_path.name.lower() == base_path.resolve().name.lower()


class LoraSource(TensorSource):
    """A PEFT LoRA adapter over the base: reads like a dense fine-tune of the base.

    FFN tensors the adapter touches are ``W_base + scaling * B @ A`` in float32; every other
    tensor is the base's. Everything is checked when the adapter is opened.

    Args:
        name: The adapter's name in the pool.
        directory: The adapter directory.
        base: The dense base model the adapter was trained on.
        base_path: The base's directory, to check ``base_model_name_or_path`` (None: skip).

    Raises:
        SourceError: For pickled weights, a non-LoRA or unsupported LoRA variant, another
            base (name or shapes), or a damaged adapter.
    """

    def __init__(
        self, name: str, directory: str | Path, base: TensorSource, base_path: Path | None = None
    ) -> None:
        super().__init__(name, base.config)
        self.directory = Path(directory)
        self.base = base
        cfg = self._read_config()
        self.adapter_config = cfg
        weights = self.directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (self.directory / PICKLED_WEIGHTS).is_file():
                raise SourceError(
                    f"Adapter '{name}': {self.directory} holds only pickled weights "
                    f"({PICKLED_WEIGHTS}), which can run arbitrary code when loaded and are not "
                    "read. Convert them once, where you trust the file: load the adapter with "
                    "PEFT and call `save_pretrained(dir, safe_serialization=True)`."
                )
            raise SourceError(f"Adapter '{name}': {weights} is missing.")
        declared = cfg.get("base_model_name_or_path") or ""
        if not _same_base(declared, base_path):
            raise SourceError(
                f"Adapter '{name}' was trained on '{declared}', not on the base '{base_path}'. "
                "An adapter only fits the model it was trained on: train it on this base, or, "
                "if both are the same model under different names, set base_model_name_or_path "
                f"in {self.directory / ADAPTER_CONFIG} to the base's path."
            )
        self._load_weights(weights, cfg)

    def _read_config(self) -> dict[str, Any]:
        file = self.directory / ADAPTER_CONFIG
        cfg = read_json_object(file, f"Adapter '{self.name}'")
        kind = cfg.get("peft_type")
        if kind != "LORA":
            raise SourceError(
                f"Adapter '{self.name}' is a {kind} adapter; only LoRA adapters (peft_type "
                "LORA) can be read as sources. Merge it with PEFT (`merge_and_unload()`), save "
                "the model and put that directory in the pool instead."
            )
        for flag, why in _UNSUPPORTED_FLAGS.items():
            if cfg.get(flag):
                raise SourceError(
                    f"Adapter '{self.name}' is not supported: {why}. Merge it with PEFT "
                    "(`merge_and_unload()`), save the model and put that directory in the pool."
                )
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise SourceError(
                f"Adapter '{self.name}' was initialised with init_lora_weights={init!r}, which "
                "changes the base weights it applies to; convert it to a plain LoRA adapter "
                "(PEFT's path_initial_model_for_weight_conversion) or merge it with PEFT."
            )
        return cfg

    def _load_weights(self, weights: Path, cfg: dict[str, Any]) -> None:
        try:
            handle = safe_open(str(weights), framework="pt")
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        except Exception as err:
            raise SourceError(
                f"Adapter '{self.name}': cannot open {weights} ({err}); the file is truncated "
                "or corrupt."
            ) from err
        self._handle = handle
        pairs: dict[str, dict[str, str]] = {}
        ignored: set[str] = set()
        for key in keys:
            match = _LORA_KEY.match(key)
            module = match["module"] if match else key.removeprefix("base_model.model.")
            if match and _FFN_MODULE.match(module):
                pairs.setdefault(module, {})[match["ab"]] = key
            else:
                ignored.add(module.rsplit(".lora_", 1)[0].removesuffix(".weight"))
        if not pairs:
            raise SourceError(
                f"Adapter '{self.name}' adapts no FFN projection (gate_proj, up_proj, down_proj): "
                "it cannot make an expert. Target the FFN modules when training the adapter."
            )
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self._updates: dict[str, tuple[str, str, float]] = dict(
            self._update(module, ab, shapes, cfg) for module, ab in sorted(pairs.items())
        )
        self.fan_in_fan_out = fan_in_fan_out
        if ignored:
            log.warning(
                "Adapter '%s' also changes %d non-FFN module(s) (%s): those updates cannot go "
                "into experts and are not used; the MoE keeps the base's weights there.",
                self.name,
                len(ignored),
                ", ".join(sorted(ignored)[:6]) + (", ..." if len(ignored) > 6 else ""),
            )

    def _update(
        self,
        module: str,
        ab: dict[str, str],
        shapes: dict[str, tuple[int, ...]],
        cfg: dict[str, Any],
    ) -> tuple[str, tuple[str, str, float]]:
        """The base weight one (lora_A, lora_B) pair updates, its keys and its scaling, checked
        against the base."""
        if set(ab) != {"A", "B"}:
            raise SourceError(
                f"Adapter '{self.name}': module '{module}' has lora_{''.join(ab)} but not "
                "both lora_A and lora_B; the adapter is incomplete."
            )
        weight_key = f"{module}.weight"
        if weight_key not in self.base.keys():
            raise SourceError(
                f"Adapter '{self.name}' adapts '{module}', which the base does not have; "
                "it was trained on another model."
            )
        (r, fan_in), (fan_out, r_b) = shapes[ab["A"]], shapes[ab["B"]]
        out_f, in_f = self.base.shape(weight_key)
        if cfg.get("fan_in_fan_out"):
            out_f, in_f = in_f, out_f
        if r != r_b or (fan_out, fan_in) != (out_f, in_f):
            raise SourceError(
                f"Adapter '{self.name}': the update of '{module}' is ({fan_out} x {r_b}) @ "
                f"({r} x {fan_in}) but the base weight is {out_f} x {in_f}; the adapter was "
                "trained on another model."
            )
        alpha = float(cfg.get("lora_alpha", 8))
        lora_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        scaling = lora_alpha / math.sqrt(r) if cfg.get("use_rslora") else lora_alpha / r
        return weight_key, (ab["A"], ab["B"], scaling)

    @property
    def adapted_keys(self) -> list[str]:
        """The base tensors this adapter changes (FFN weights)."""
        return list(self._updates)

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self._updates else self.base.dtype(key)

    def _read(self, key: str) -> torch.Tensor:
        base = self.base.get(key)
        if key not in self._updates:
            return base
        a_key, b_key, scaling = self._updates[key]
        lora_a = self._handle.get_tensor(a_key).to(torch.float32)
        lora_b = self._handle.get_tensor(b_key).to(torch.float32)
        delta = (lora_b @ lora_a) * scaling  # PEFT's get_delta_weight, in float32
        if self.fan_in_fan_out:
            delta = delta.T
        return base.to(torch.float32) + delta

    def close(self) -> None:
        self._handle = None


def open_adapter(
    name: str, path: str | os.PathLike, base: TensorSource | None, base_path: Path | None
) -> TensorSource:
    """Open a PEFT LoRA adapter directory as a source over ``base``.

    Raises:
        SourceError: If there is no base to apply it to, or the adapter does not fit.
    """
    if base is None:
        raise SourceError(
            f"Model '{name}' at {path} is a PEFT adapter, not a full model: the base "
            "(_pretrained_) must be a full model; adapters can only be sources."
        )
    return LoraSource(name, path, base, base_path)
