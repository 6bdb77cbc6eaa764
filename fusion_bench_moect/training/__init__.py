"""Continual training of an upcycled MoE (``method=moe_ct_training``) on Lightning Fabric.

Modules: ``algorithm`` (the FusionBench algorithm and its loop), ``data`` (streamed, packed
windows and their per-rank order), ``freeze`` (stages, frozen anchors), ``losses``
(load-balancing coefficient ramp, router z-loss), ``plots`` (the training-history plot).
"""

from .algorithm import MoECTTrainingAlgorithm
from .data import TrainingDataError, token_windows
from .freeze import STAGES

__all__ = ["STAGES", "MoECTTrainingAlgorithm", "TrainingDataError", "token_windows"]
