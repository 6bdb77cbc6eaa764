"""``OrthogonalMoECTMergingAlgorithm``: validation and orchestration only.

The build itself is ``pipeline.run_pipeline`` (shared with the lean CLI): the math lives in
``ops/``, the per-family details in ``arch/``, the disk I/O in ``io/`` and the
tensor-by-tensor engine in ``build.py``. See docs/algorithm.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from fusion_bench import BaseModelPool, auto_register_config
from fusion_bench.mixins import SimpleProfilerMixin

from ._compat import ensure_fusion_bench_mixtral_importable
from ._config import to_plain

ensure_fusion_bench_mixtral_importable()
from fusion_bench.method import MixtralForCausalLMMergingAlgorithm  # noqa: E402

from .errors import one_line_errors  # noqa: E402
from .io.pool import (  # noqa: E402
    declared_model_path,
    model_kwargs_dtype,
    open_source,
    pool_model_path,
)
from .io.sources import check_local_path  # noqa: E402
from .io.streaming import TOKENIZER_FILES  # noqa: E402
from .params import MoECTConfig, init_signature  # noqa: E402
from .pipeline import ModelInputs, run_pipeline  # noqa: E402
from .program import SavedBySaveCheckpoint  # noqa: E402

log = logging.getLogger(__name__)


@auto_register_config
class OrthogonalMoECTMergingAlgorithm(
    SavedBySaveCheckpoint, SimpleProfilerMixin, MixtralForCausalLMMergingAlgorithm
):
    """Upcycle a dense causal LM, or merge its fine-tunes, into a Mixture-of-Experts model.

    Pure upcycling (a pool with only ``_pretrained_``) makes ``num_experts`` copies of the
    base FFN; merging makes one expert per source model, fused with the base FFN by
    ``lerp(W_base, W_source, alpha_l)`` under a layer-wise alpha schedule (MoE-CT), plus the
    base FFN itself as an anchor expert. Routers start orthogonal by default.

    Every parameter, its default and its meaning: ``MoECTConfig`` in ``params.py`` (the
    signature below is generated from it) and docs/algorithm.md.
    """

    def __init__(self, **kwargs: Any):
        # ``auto_register_config`` has set every parameter as an attribute (from the generated
        # signature); FusionBench's base class still wants its three and warns on the rest.
        super().__init__(
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            save_checkpoint=self.save_checkpoint,
            **{k: v for k, v in kwargs.items() if k not in MoECTConfig.names()},
        )

    __init__.__signature__ = init_signature()

    @property
    def moect_config(self) -> MoECTConfig:
        """The current parameter values, checked (raises ValueError naming a bad one)."""
        return MoECTConfig(**{name: to_plain(getattr(self, name)) for name in MoECTConfig.names()})

    def parameters_record(self) -> dict[str, Any]:
        """Every algorithm parameter as plain JSON-able values."""
        return self.moect_config.record()

    @one_line_errors
    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | torch.nn.Module) -> torch.nn.Module | None:
        """Build the MoE model from the pool (and save it when ``save_checkpoint`` is set).

        Args:
            modelpool: A pool with ``_pretrained_`` (the dense base) and zero or more source
                experts of the same architecture; or a dense base model.

        Returns:
            The MoE causal LM (Mixtral, Qwen2-MoE or Qwen3-MoE), in eval mode; None with
            ``streaming: true`` (the model exists only on disk, at ``save_checkpoint``).
        """
        config = self.moect_config
        if isinstance(modelpool, torch.nn.Module):
            modelpool = BaseModelPool({"_pretrained_": modelpool})
        if not modelpool.has_pretrained:
            raise ValueError(
                "The model pool has no '_pretrained_' entry: add `_pretrained_: <path to the "
                "dense base model>` to its `models`."
            )
        with self.profile("build"):
            result = run_pipeline(config, pool_inputs(modelpool))
        if config.streaming:
            log.info(
                "streaming: the MoE model was written to %s and is not kept in memory; run() "
                "returns None, so FusionBench skips its evaluation. Evaluate the checkpoint "
                "with e.g. `fusion_bench method=dummy modelpool=CausalLMPool/moe_ct_upcycle "
                "modelpool.models._pretrained_=%s taskpool=...`.",
                config.save_checkpoint,
                config.save_checkpoint,
            )
        return result.model


def check_pool_paths(modelpool: BaseModelPool) -> None:
    """Every local path of the pool (models, tokenizer) exists and is readable, before any
    model or tokenizer loads.

    Raises:
        SourceError: Naming the entry and the path.
    """
    for name in ["_pretrained_", *modelpool.model_names]:
        path = declared_model_path(modelpool, name)
        check_local_path(f"Model '{name}'", path, ("config.json", "adapter_config.json"))
    tokenizer = getattr(modelpool, "tokenizer", None)
    check_local_path("The model pool's tokenizer", tokenizer, TOKENIZER_FILES)


def pool_inputs(modelpool: BaseModelPool) -> ModelInputs:
    """The pipeline's inputs from a FusionBench model pool (its paths checked first)."""
    check_pool_paths(modelpool)
    tokenizer = None
    declared = getattr(modelpool, "tokenizer", None)
    if declared is not None:
        try:
            tokenizer = modelpool.load_tokenizer()
        except Exception as err:
            raise ValueError(f"The model pool's tokenizer cannot be loaded: {err}") from err
    vocabulary_dir = None
    if isinstance(declared, (str, os.PathLike)) and Path(declared).is_dir():
        vocabulary_dir = Path(declared)
    kwargs = getattr(modelpool, "model_kwargs", None) or {}
    return ModelInputs(
        source_names=list(modelpool.model_names),
        open=lambda name, base: open_source(modelpool, name, base=base),
        directory=lambda name: pool_model_path(modelpool, name),
        tokenizer=tokenizer,
        vocabulary_dir=vocabulary_dir,
        default_dtype=model_kwargs_dtype(kwargs),
        load_dense=lambda: modelpool.load_model("_pretrained_"),
        given=lambda name: declared_model_path(modelpool, name),
    )
