"""``MoECTTrainingAlgorithm`` (``method=moe_ct_training``): continual training of an upcycled MoE
on FusionBench's Lightning Fabric. Validation and orchestration only.

Run by ``fusion_bench``, the algorithm trains on the program's Fabric, so ``fabric.devices``,
``fabric.strategy``, ``fabric.precision`` and ``fabric.loggers`` apply; called from Python it
builds a single-device Fabric (``accelerator``, ``precision``). The parameters are
``config.TrainingConfig``; ``freeze`` decides what trains, ``data`` the windows and their order,
``loop`` the steps, ``metrics`` what is measured, ``checkpoints`` step checkpoints and resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import FabricTrainingMixin
from torch import nn
from torch.utils.data import DataLoader

from .._config import to_plain
from ..errors import one_line_errors
from ..inspection import moe_ct_record
from ..io.checkpoint import check_destination
from ..io.pool import read_directories
from ..program import SavedBySaveCheckpoint
from ..progress import library_bars
from ..schema import signature
from . import checkpoints, loading, resume
from .balancing import Balancer, check_balancing
from .config import TrainingConfig, docstring
from .data import log_data_plan, shared_training_data
from .freeze import TrainingPlan, apply_requires_grad, plan_training
from .host_memory import give_back_freed_blocks
from .loop import Position, TrainingLoop, TrainRun
from .losses import set_model_aux_coefficient
from .metrics import Evaluator
from .optim import build_optimizer, build_scheduler
from .plots import HISTORY_PLOT, plot_training_history
from .runtime import training_record
from .sampler import MixtureBatchSampler, WindowBatchSampler
from .sharding import is_sharded, set_experts_implementation
from .voice import one_voice

log = logging.getLogger(__name__)


@auto_register_config
class MoECTTrainingAlgorithm(SavedBySaveCheckpoint, BaseAlgorithm, FabricTrainingMixin):
    __doc__ = docstring(
        """Continue training an MoE made by ``moe_ct_upcycling`` on user text, with Lightning Fabric.

    The global batch is ``batch_size`` x processes x ``accumulate_grad_batches`` windows of
    ``seq_len`` tokens. Anchors (``anchor_experts``, by default the model's
    ``config.moe_ct.anchor_experts``), the Qwen2-MoE shared expert and every non-FFN weight
    stay bit-identical on every rank. Every parameter is checked here, before any work.
"""
    )

    # ``save_checkpoint`` is the output directory (as in moe_ct_upcycling); it takes the
    # place of the mixin's abstract checkpoint hook, which this loop does not use.
    save_checkpoint = None
    max_steps_per_epoch = -1
    #: Bytes of the checkpoint this process read while loading sharded (0: the pool loaded it).
    bytes_loaded = 0

    @one_line_errors  # a bad parameter is one line through ``fusion_bench``, as in run()
    def __init__(self, **kwargs: Any):
        super().__init__(**{k: v for k, v in kwargs.items() if k not in TrainingConfig.names()})
        self.training_config  # noqa: B018 (checks every value now, before any work)
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.data_plan: dict[str, Any] = {}

    __init__.__signature__ = signature(TrainingConfig)

    @property
    def training_config(self) -> TrainingConfig:
        """The current parameter values, checked (raises ValueError naming a bad one)."""
        return TrainingConfig(
            **{name: to_plain(getattr(self, name)) for name in TrainingConfig.names()}
        )

    def setup_lightning_fabric(self, config: Any) -> None:
        """Without a FusionBench program: one device (``accelerator``, ``precision``)."""
        if self._fabric_instance is None:
            self._fabric_instance = L.Fabric(
                accelerator=self.accelerator, devices=1, precision=self.precision
            )
            self._fabric_instance.launch()

    # ------------------------------------------------------------------ run
    @one_line_errors
    def run(self, modelpool: BaseModelPool | nn.Module) -> nn.Module:
        """Train the pool's ``_pretrained_`` MoE and return it (also saved when asked).

        With several processes only rank 0 logs (docs/training.md); transformers' own bars
        follow the package's progress policy (a terminal only, rank 0 only)."""
        rank = self.fabric.global_rank
        give_back_freed_blocks()  # before the model is loaded: every large block from here on
        with one_voice(rank), library_bars(enabled=rank == 0):
            return self._train(modelpool)

    def _train(self, modelpool: BaseModelPool | nn.Module) -> nn.Module:
        config = self.training_config
        if config.ckpt_path:
            resume.read_manifest(config.ckpt_path)
        if config.save_checkpoint:
            reads = read_directories(
                modelpool, ckpt_path=config.ckpt_path, tokenizer=config.tokenizer
            )
            check_destination(config.save_checkpoint, config.overwrite, reads)
        model, tokenizer = self._load(modelpool, config)
        check_balancing(model, config)  # before the data is read
        plan = self._plan(model, config)
        windows, sampler, steps_per_epoch, total = self._data(model, tokenizer, plan, config)
        sources = _named(config.eval_sources)
        evaluator = Evaluator(config, tokenizer, sources) if sources else None
        set_model_aux_coefficient(model, 0.0)  # the loop adds the (ramped) aux loss itself
        set_experts_implementation(model, config.experts_implementation)
        run = self._setup(model, plan, windows, sampler, config)
        run.balancer = Balancer(self.fabric, config, run.module, plan.info)
        run.scheduler = build_scheduler(config, run.optimizer, total)
        run.total, run.steps_per_epoch, run.tokenizer = total, steps_per_epoch, tokenizer
        self.history, self.evaluations = run.history, run.evaluations
        position: Position = {"step": 0, "epoch": 0, "skip": 0}
        if config.checkpoint_every and self.fabric.is_global_zero:
            checkpoints.clear_stale(checkpoints.checkpoint_root(config))
        if config.ckpt_path:
            position = resume.restore(self.fabric, config, run)
        elif evaluator is not None:
            self._evaluate(evaluator, run, 0)

        def on_step(reached: Position) -> None:
            step, every = reached["step"], config.eval_every
            if evaluator is not None and (step == total or (every and step % every == 0)):
                self._evaluate(evaluator, run, step)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoints.save_step(self.fabric, config, run, reached)

        TrainingLoop(self.fabric, config, run, self.clip_gradients_if_needed, on_step).train(
            position
        )
        run.balancer.close()
        return self._finish(run, config)

    def _evaluate(self, evaluator: Evaluator, run: TrainRun, step: int) -> None:
        entry = evaluator.evaluate(self.fabric, run.module, step, everywhere=run.sharded)
        if entry is not None:
            run.evaluations.append(entry)

    # ------------------------------------------------------------------ set-up
    def _load(self, modelpool: BaseModelPool | nn.Module, config: TrainingConfig) -> tuple:
        if isinstance(modelpool, nn.Module):
            model, tokenizer = modelpool, None
        else:
            # FSDP2: an empty model, each process reads its shards in _setup (loading)
            source = loading.sharded_source(self.fabric, modelpool)
            model = loading.empty_model(source) if source else modelpool.load_model("_pretrained_")
            tokenizer = (
                modelpool.load_tokenizer() if getattr(modelpool, "tokenizer", None) else None
            )
        if tokenizer is None and config.tokenizer:
            from transformers import AutoTokenizer  # keeps the module's import light

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        if tokenizer is None:
            raise ValueError(
                "moe_ct_training needs a tokenizer: set `tokenizer:` in the model pool or the "
                "method's `tokenizer: <directory>`."
            )
        return model, tokenizer

    @staticmethod
    def _plan(model: nn.Module, config: TrainingConfig) -> TrainingPlan:
        record = moe_ct_record(model) or {}
        anchors = config.anchor_experts
        if anchors is None:
            anchors = list(record.get("anchor_experts", []))
        return plan_training(model, config.stage, anchors)

    @staticmethod
    def _check_vocabulary(model: nn.Module, tokenizer: Any, largest: int) -> None:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows or largest >= rows:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens (largest id in the data: {largest}) "
                f"but the model's embedding has {rows} rows: the tokenizer does not belong to "
                "this model; use the tokenizer the model was built with."
            )

    def _data(self, model: nn.Module, tokenizer: Any, plan: TrainingPlan, config: TrainingConfig):
        """Windows (memory-mapped stores), this rank's batch sampler, optimiser steps per
        epoch and in all; the data plan is logged and kept in ``self.data_plan``."""
        fabric = self.fabric
        sources = _named(config.train_sources)
        if not sources:
            raise ValueError(
                "moe_ct_training has no train_sources: set e.g. "
                "`method.train_sources={de: {debian_reference: de, split: train}}`."
            )
        windows = shared_training_data(fabric, tokenizer, sources, config.seq_len,
                                       config.data_cache_dir, config.max_tokens_per_source)  # fmt: skip
        self._check_vocabulary(model, tokenizer, windows.largest_id)
        accumulate, world = config.accumulate_grad_batches, fabric.world_size
        global_batch = config.batch_size * world * accumulate
        mixture = windows.mixture(global_batch, config.seed)
        if mixture is None:
            sampler = WindowBatchSampler(
                len(windows), config.batch_size, world, fabric.global_rank, config.seed
            )
        else:
            sampler = MixtureBatchSampler(mixture, windows.offsets, config.batch_size, world,
                                          fabric.global_rank, accumulate)  # fmt: skip
        steps_per_epoch = sampler.num_batches // accumulate
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(windows)} windows give {sampler.num_batches} micro-batches per process, "
                f"fewer than accumulate_grad_batches={accumulate}; add text or lower the batch."
            )
        limits = [config.max_steps, config.max_epochs * steps_per_epoch]
        total = min(n for n in limits if n > 0)
        sampler.plan = self.data_plan = windows.plan(mixture, global_batch, total)
        if fabric.is_global_zero:
            log.info(
                "moe_ct_training: stage %s, %d steps (%d per epoch) x %d processes x %d "
                "micro-batches x %d windows of %d tokens; anchors %s frozen",
                config.stage, total, steps_per_epoch, world, accumulate,
                config.batch_size, config.seq_len, plan.anchors or "none",
            )  # fmt: skip
            log_data_plan(self.data_plan, weighted=mixture is not None)
        return windows, sampler, steps_per_epoch, total

    def _setup(self, model, plan, windows, sampler, config: TrainingConfig) -> TrainRun:
        """Freeze for the stage, then hand model, optimiser and loader to Fabric."""
        fabric = self.fabric
        trainable = apply_requires_grad(model, plan, config.stage)
        if fabric.is_global_zero:
            log.info(
                "Trainable parameters: %d of %d",
                sum(p.numel() for p in trainable),
                sum(p.numel() for p in model.parameters()),
            )
        names = {id(p): n for n, p in model.named_parameters()}
        expert_names = {names[id(p)] for p in plan.experts}
        trainable_names = {names[id(p)] for p in trainable}
        resumable = bool(config.checkpoint_every or config.ckpt_path)
        guard, identity, self.bytes_loaded = loading.prepare(
            fabric, model, plan, trainable_names, resumable
        )
        model = fabric.setup_module(model)
        optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        optimizer = fabric.setup_optimizers(optimizer)
        loader = fabric.setup_dataloaders(
            DataLoader(windows, batch_sampler=sampler),
            use_distributed_sampler=False,
        )
        # names again, in the unwrapped model: FSDP2 replaced the parameter objects
        experts = [p for n, p in model.module.named_parameters() if n in expert_names]
        return TrainRun(
            model=model, optimizer=optimizer, scheduler=None, loader=loader, sampler=sampler,
            plan=plan, guard=guard, experts=experts, trainable=trainable_names, total=0,
            steps_per_epoch=0, tokenizer=None, sharded=is_sharded(model), identity=identity,
        )  # fmt: skip

    def _finish(self, run: TrainRun, config: TrainingConfig) -> nn.Module:
        """Record the run in the config, save and plot. The parameters keep the stage's
        ``requires_grad``, so parameter counts after the run say what trained."""
        fabric, module = self.fabric, run.module
        module.eval()
        set_model_aux_coefficient(module, config.router_aux_loss_coef)
        final = {k: v for k, v in run.history[-1].items() if k != "layers"} if run.history else {}
        record = training_record(config.record(), fabric, module)
        module.config.moe_ct_training = {**record, "final": final, "data_plan": self.data_plan}
        if config.save_checkpoint:  # the plot goes in with the model, in the same rename
            title = f"moe_ct_training ({config.stage})"
            checkpoints.save_model(fabric, run, Path(config.save_checkpoint), title)
        if self.log_dir is not None and fabric.is_global_zero:
            plot_training_history(run.history, run.evaluations, Path(self.log_dir) / HISTORY_PLOT)
        return module

    # the mixin's epoch hook: this loop runs whole epochs in ``run``
    def train_epoch(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        raise NotImplementedError("MoECTTrainingAlgorithm trains in run().")


def _named(value: Any) -> dict[str, Any]:
    """Sources as ``{name: source}`` (a list gets ``source0``, ``source1``, ...)."""
    if isinstance(value, dict):
        return dict(value)
    return {f"source{i}": spec for i, spec in enumerate(value or [])}
