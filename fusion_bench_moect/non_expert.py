"""The non-expert weights merged by a FusionBench algorithm (``non_expert_merge``).

The experts come from the sources' FFNs; everything else (attention, norms, embeddings,
``lm_head``) is the base's by default. With ``non_expert_merge`` set to a FusionBench
algorithm's config, those tensors (or the ones ``non_expert_tensors`` selects) are what that
algorithm makes of the pool: its own ``run`` is called on a ``BaseModelPool`` whose models are
small modules holding only those tensors, under their real names, with the base as
``_pretrained_`` and the sources as the models, in float32; the result is cast once to the
output dtype.

- Elementwise methods (``ELEMENTWISE``: simple average, weighted average, task arithmetic):
  an output element depends only on the same element of each model, so ``run`` is called on
  one piece of one tensor at a time (``ops.non_expert.row_pieces``). Memory: one tensor of
  every model plus pieces of at most 16 MB; this streams.
- Any other method (TIES trims each task vector by a magnitude threshold taken over all
  merged tensors together and elects signs over them; DARE draws random masks): ``run`` once
  on every selected tensor of every model, in float32, kept until written. In memory only:
  ``streaming: true`` refuses it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .io.sources import TensorSource
from .ops.non_expert import row_pieces, select_tensors
from .params import KEEP_BASE
from .plan import BASE_EXPERT

log = logging.getLogger(__name__)

#: FusionBench algorithms (in ``fusion_bench.method``) whose result is elementwise in the
#: models' weights: safe to run piece by piece, and so to stream.
ELEMENTWISE = ("SimpleAverageAlgorithm", "WeightedAverageAlgorithm", "TaskArithmeticAlgorithm")
#: A tied model saves no ``lm_head``: its ``lm_head`` is its embedding.
_TIED = {"lm_head.weight": "model.embed_tokens.weight"}


@dataclass
class NonExpertMerge:
    """A FusionBench algorithm applied to the pool's non-expert tensors.

    Attributes:
        target: The algorithm's ``_target_``.
        algorithm: The algorithm, instantiated from its config.
        elementwise: Whether it is run piece by piece (else once on every selected tensor).
        keys: The base tensor names it merges.
        models: ``_pretrained_`` then the sources, in pool order.
    """

    target: str
    algorithm: Any
    elementwise: bool
    keys: list[str]
    models: dict[str, TensorSource]
    _merged: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._covered = frozenset(self.keys)

    def covers(self, key: str) -> bool:
        """Whether base tensor ``key`` is merged (else it is the base's)."""
        return key in self._covered

    def merged(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The merged tensor ``key`` in ``dtype`` (its own memory)."""
        if not self.elementwise:
            if self._merged is None:
                self._merged = self._merge_all()
            return self._merged[key].to(dtype, copy=True)
        tensors = {name: read(source, key) for name, source in self.models.items()}
        shape = next(iter(tensors.values())).shape
        out = torch.empty(shape, dtype=dtype)
        for piece in row_pieces(shape):
            pool = {
                name: {key: t[piece].to(torch.float32, copy=True)} for name, t in tensors.items()
            }
            out[piece] = self.run(pool)[key]
        return out

    def _merge_all(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        pool = {
            name: {key: read(source, key).to(torch.float32, copy=True) for key in self.keys}
            for name, source in self.models.items()
        }
        merged = self.run(pool)
        log.info("Non-expert merge: %d tensors in %.1f s", len(merged), time.perf_counter() - start)
        return merged

    def run(self, pool: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FusionBench's ``run`` on a pool of modules holding ``pool[model][key]`` (float32,
        their own memory: algorithms write into their models); the merged tensors by key.

        Raises:
            ValueError: When the algorithm fails, naming it.
        """
        # Lazy: FusionBench (~5 s) loads only when a merge is asked for (the lean CLI's default).
        from fusion_bench.modelpool import BaseModelPool

        modules = BaseModelPool({name: tensor_module(t) for name, t in pool.items()})
        try:
            with _quiet():
                result = self.algorithm.run(modules)
        except Exception as err:
            raise ValueError(
                f"non_expert_merge: {self.target} failed on the non-expert tensors "
                f"({type(err).__name__}: {err}); check its parameters."
            ) from err
        state = result if isinstance(result, Mapping) else result.state_dict()
        return {key: state[key].detach() for key in next(iter(pool.values()))}

    def record(self) -> dict[str, Any]:
        """What was merged, for ``config.moe_ct`` (the config itself is in ``params``)."""
        return {
            "method": self.target,
            "models": list(self.models),
            "tensors": len(self.keys),
            "elementwise": self.elementwise,
        }


def read(source: TensorSource, key: str) -> torch.Tensor:
    """Tensor ``key`` of a model (a tied model's embedding for its ``lm_head``)."""
    if key in _TIED and key not in source.keys():
        key = _TIED[key]
    return source.get(key)


def tensor_module(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module whose ``state_dict`` is ``tensors`` (dotted names become sub-modules)."""
    root = nn.Module()
    for key, tensor in tensors.items():
        *path, attr = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
    return root


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """FusionBench's algorithms print a profile table and log per ``run``: silent here, where
    ``run`` is called once per piece (our own log line says what was merged)."""
    logger = logging.getLogger("fusion_bench")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def import_algorithm(target: str) -> tuple[type, bool]:
    """Import everything a merge with ``target`` needs (FusionBench's pool and the class), and
    return the class and whether it is elementwise.

    Raises:
        ValueError: If it cannot be imported or is not a FusionBench algorithm.
    """
    # Lazy: FusionBench (~5 s) loads only when a merge is asked for (the lean CLI's default).
    import fusion_bench.method as methods
    import fusion_bench.modelpool  # noqa: F401  (what ``NonExpertMerge.run`` imports)

    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # ImportError, AttributeError, or the module's own failure
        raise ValueError(
            f"non_expert_merge: _target_ {target!r} cannot be imported ({type(err).__name__}: "
            f"{err}); give a FusionBench algorithm class, e.g. "
            "fusion_bench.method.SimpleAverageAlgorithm."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, methods.BaseAlgorithm)):
        raise ValueError(
            f"non_expert_merge: _target_ {target!r} is not a FusionBench algorithm (a "
            "fusion_bench.method.BaseAlgorithm); give one, e.g. "
            "fusion_bench.method.TaskArithmeticAlgorithm."
        )
    return cls, any(cls is getattr(methods, name) for name in ELEMENTWISE)


def make_non_expert_merge(
    config: Mapping[str, Any] | str,
    pattern: str | None,
    base: TensorSource,
    sources: Mapping[str, TensorSource],
    non_ffn_keys: Sequence[str],
    streaming: bool,
) -> NonExpertMerge | None:
    """The merge ``non_expert_merge`` asks for (None for ``base``), checked before any tensor
    is computed: the class, its parameters (one ``run`` on one-element tensors), the
    selection, and that it can stream when ``streaming``.

    Args:
        config: ``base`` or the algorithm's config (``_target_`` and its parameters).
        pattern: ``non_expert_tensors``.
        base: The dense base.
        sources: The sources by pool name, in pool order.
        non_ffn_keys: The base's non-FFN tensor names.
        streaming: Whether the output is streamed (elementwise methods only).

    Raises:
        ValueError: Naming what is wrong and the fix.
    """
    if config == KEEP_BASE:
        return None
    target = config["_target_"]
    if not sources:
        raise ValueError(
            "non_expert_merge merges the pool's models, but the pool has only the base (pure "
            "upcycling); add source models, or set non_expert_merge: base."
        )
    cls, elementwise = import_algorithm(target)
    if streaming and not elementwise:
        raise ValueError(
            f"non_expert_merge: {target} is not elementwise (it needs every merged tensor of "
            "every model at once), so it cannot stream; set streaming: false (not the lean "
            f"CLI), or use one of fusion_bench.method.{{{', '.join(ELEMENTWISE)}}}."
        )
    floating = [k for k in non_ffn_keys if base.dtype(k).is_floating_point]
    keys = select_tensors(floating, pattern)
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    try:
        algorithm = cls(**kwargs)
    except Exception as err:
        raise ValueError(
            f"non_expert_merge: {target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
            f"cannot be created ({type(err).__name__}: {err}); give its parameters beside "
            "_target_."
        ) from err
    merge = NonExpertMerge(target, algorithm, elementwise, keys, {BASE_EXPERT: base, **sources})
    merge.run({name: {"probe.weight": torch.zeros(1)} for name in merge.models})
    log.info(
        "Non-expert weights: %d of %d tensors merged by %s over %s (%s)",
        len(keys),
        len(non_ffn_keys),
        target,
        ", ".join(merge.models),
        "tensor by tensor" if elementwise else "all at once, in memory",
    )
    return merge
