"""Make ``fusion_bench.method.MixtralForCausalLMMergingAlgorithm`` importable on transformers 5.

FusionBench 0.2.x imports two names that transformers 5 moved or removed:
``transformers.modeling_utils.no_init_weights`` (now in ``transformers.initialization``) and
``MixtralBlockSparseTop2MLP`` (experts are fused 3-D tensors now). We add only what is
missing, never replace anything, and never use the stand-in: our algorithm overrides
``run`` and builds every weight itself.
"""

from __future__ import annotations

import sys

from torch import nn


class _RemovedMixtralBlockSparseTop2MLP(nn.Module):
    """Stand-in for a class transformers 5 removed; FusionBench only names it."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError(
            "MixtralBlockSparseTop2MLP does not exist in transformers 5; FusionBench's own "
            "Mixtral upcycling cannot run here. Use fusion_bench_moect instead."
        )


def ensure_fusion_bench_mixtral_importable() -> None:
    """Add the two missing names, if missing, before FusionBench's Mixtral module is imported."""
    # Lazy: transformers' modelling code only when FusionBench's Mixtral module follows.
    import transformers.modeling_utils as modeling_utils
    from transformers.models.mixtral import modeling_mixtral

    if not hasattr(modeling_utils, "no_init_weights"):
        # Lazy: transformers.initialization exists in transformers 5 only.
        from transformers.initialization import no_init_weights

        modeling_utils.no_init_weights = no_init_weights
    if not hasattr(modeling_mixtral, "MixtralBlockSparseTop2MLP"):
        modeling_mixtral.MixtralBlockSparseTop2MLP = _RemovedMixtralBlockSparseTop2MLP


def ensure_lm_eval_importable() -> None:
    """lm-eval 0.4.9.x (the last FusionBench's task pool imports) names
    ``transformers.AutoModelForVision2Seq``, which transformers 5 renamed
    ``AutoModelForImageTextToText``; add the old name if missing (only its vision-language
    model class uses it)."""
    # Lazy (~10 s), and needed here: loading these swaps transformers' module in sys.modules.
    import transformers.models.auto  # noqa: F401
    import transformers.processing_utils  # noqa: F401

    module = sys.modules["transformers"]
    if not hasattr(module, "AutoModelForVision2Seq"):
        module.AutoModelForVision2Seq = module.AutoModelForImageTextToText
