"""``MoECTTrainingAlgorithm`` (``method=moe_ct_training``): continual training of an upcycled MoE
on FusionBench's Lightning Fabric.

Run by ``fusion_bench``, the algorithm trains on the program's Fabric, so ``fabric.devices``,
``fabric.strategy`` (``ddp``, ``fsdp``, ``deepspeed``), ``fabric.precision`` and
``fabric.loggers`` apply; called from Python it builds a single-device Fabric
(``accelerator``, ``precision``). The loop follows FusionBench's ``FullFinetuneSFT``: optimiser
and LR scheduler from config (default AdamW + cosine decay with linear warm-up), gradient
accumulation, clipping, ``max_steps`` / ``max_epochs``, checkpoints every N steps with the
optimiser / scheduler / step / RNG state, and exact ``ckpt_path`` resume. See ``freeze`` for
the stages and the frozen anchors, ``data`` for the windows and their order, ``losses`` for
the auxiliary losses.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from fusion_bench.mixins import FabricTrainingMixin
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._config import to_plain
from ..eval.routing import RoutingAccumulator, summarize_layers
from ..inspection import moe_ct_record
from ..io.checkpoint import check_destination
from ..io.checkpoint import save_checkpoint as write_checkpoint
from .data import WindowBatchSampler, WindowDataset, load_windows
from .freeze import STAGES, AnchorGuard, TrainingPlan, apply_requires_grad, plan_training
from .losses import aux_loss_coefficient, router_z_loss, set_model_aux_coefficient
from .plots import plot_training_history

log = logging.getLogger(__name__)

BALANCE_KEYS = (
    "mean_cv",
    "mean_max_violation",
    "mean_router_entropy",
    "dead_experts",
    "mean_anchor_share",
)
STATE_FILE = "trainer_state.ckpt"
"""Optimiser, scheduler, step and trainable weights of a step checkpoint (``fabric.save``)."""
MARKER_FILE = "trainer_state.json"
"""Written last: a step checkpoint without it is incomplete."""
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_forward_module.")


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    if hasattr(scheduler, "state_dict"):
        return scheduler.state_dict()
    # FusionBench's warm-up schedulers are plain objects: their state is their attributes
    return {k: v for k, v in vars(scheduler).items() if k != "optimizer"}


def _load_scheduler_state(scheduler: Any, state: Mapping[str, Any] | None) -> None:
    if scheduler is None or state is None:
        return
    if hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(state)
    else:
        vars(scheduler).update(state)


@auto_register_config
class MoECTTrainingAlgorithm(BaseAlgorithm, FabricTrainingMixin):
    """Continue training an MoE made by ``moe_ct_upcycling`` on user text, with Lightning Fabric.

    The global batch is ``batch_size`` x processes x ``accumulate_grad_batches`` windows of
    ``seq_len`` tokens. Anchors (``anchor_experts``, by default the model's
    ``config.moe_ct.anchor_experts``), the Qwen2-MoE shared expert and every non-FFN weight
    stay bit-identical on every rank.

    Args:
        train_sources: Named text sources, ``{name: source}`` (or a list): a file, folder,
            glob or ``.jsonl`` path, or ``{debian_reference: LANG, split: train}``,
            ``{jsonl: PATH, field: text}``, ``{paths: [...]}``, ``{text: ...}``.
        stage: ``router`` (routers only), ``experts`` (routers + non-anchor experts) or
            ``router_then_experts`` (``router_warmup_steps`` router steps, then experts).
        router_warmup_steps: Router-only steps of ``router_then_experts``.
        max_steps: Optimiser steps (``-1``: until ``max_epochs``).
        max_epochs: Passes over the data (``-1``: until ``max_steps``).
        batch_size: Windows per micro-batch per process.
        seq_len: Tokens per window.
        accumulate_grad_batches: Micro-batches per optimiser step.
        learning_rate: Peak learning rate of the default optimiser and scheduler.
        warmup_steps: Linear warm-up steps of the default cosine schedule.
        min_learning_rate: Final learning rate of the default cosine schedule.
        optimizer: Optimiser config (``_target_`` + kwargs, instantiated with the trainable
            parameters); ``None`` = AdamW(``learning_rate``, weight_decay=0).
        lr_scheduler: Scheduler config (``_target_`` + kwargs; the value ``_T_max_`` is
            replaced by the total steps); ``None`` = FusionBench's ``CosineDecayWithWarmup``;
            ``"constant"`` = no schedule.
        gradient_clip_val: Clipping threshold (``None`` or 0 = off).
        gradient_clip_algorithm: ``norm`` or ``value``.
        router_aux_loss_coef: Coefficient of the load-balancing loss.
        aux_loss_ramp_steps: Linear ramp of that coefficient over the first steps (0 = none).
        router_z_loss_coef: Coefficient of the router z-loss (0 = off).
        anchor_experts: Frozen expert indices; ``None`` = the model's ``config.moe_ct`` record.
        max_tokens_per_source: Tokens read per training source (``None`` = all).
        seed: Seed of the data order (one permutation per epoch).
        log_every: Steps between log lines (metrics go to the Fabric loggers every step).
        eval_sources: Held-out sources for evaluation during training (``MoETextTaskPool``
            sources); ``None`` = no evaluation.
        eval_every: Steps between evaluations (0 = before and after training only).
        eval_max_tokens_per_source: Tokens evaluated per source.
        eval_batch_size: Windows per evaluation forward pass.
        checkpoint_every: Steps between resumable checkpoints (0 = none).
        checkpoint_dir: Where step checkpoints go (``step-000010/``); default
            ``<save_checkpoint>-checkpoints``.
        ckpt_path: A step checkpoint to resume from (same data, batch and process count).
        save_checkpoint: Directory of the trained model (hub layout, with
            ``training_history.json`` and ``training_history.png``).
        overwrite: Replace a non-empty ``save_checkpoint``.
        accelerator: Accelerator of the single-device Fabric built when no FusionBench
            program provides one (the CLI uses ``fabric.accelerator``).
        precision: Precision of that Fabric (the CLI uses ``fabric.precision``).
        tokenizer: Tokenizer directory, used when the pool has no tokenizer or ``run`` is
            given a model object.
    """

    # ``save_checkpoint`` is the output directory (as in moe_ct_upcycling); it takes the
    # place of the mixin's abstract checkpoint hook, which this loop does not use.
    save_checkpoint = None
    max_steps_per_epoch = -1

    def __init__(
        self,
        train_sources: Mapping[str, Any] | list[Any] = (),
        stage: str = "router",
        router_warmup_steps: int = 0,
        max_steps: int = 50,
        max_epochs: int = -1,
        batch_size: int = 4,
        seq_len: int = 256,
        accumulate_grad_batches: int = 1,
        learning_rate: float = 1e-4,
        warmup_steps: int = 0,
        min_learning_rate: float = 0.0,
        optimizer: Mapping[str, Any] | None = None,
        lr_scheduler: Mapping[str, Any] | str | None = None,
        gradient_clip_val: float | None = 1.0,
        gradient_clip_algorithm: str = "norm",
        router_aux_loss_coef: float = 0.01,
        aux_loss_ramp_steps: int = 0,
        router_z_loss_coef: float = 0.0,
        anchor_experts: list[int] | None = None,
        max_tokens_per_source: int | None = 200_000,
        seed: int = 0,
        log_every: int = 10,
        eval_sources: Mapping[str, Any] | None = None,
        eval_every: int = 0,
        eval_max_tokens_per_source: int = 4096,
        eval_batch_size: int = 4,
        checkpoint_every: int = 0,
        checkpoint_dir: str | None = None,
        ckpt_path: str | None = None,
        save_checkpoint: str | None = None,
        overwrite: bool = False,
        accelerator: str = "auto",
        precision: str = "32-true",
        tokenizer: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def setup_lightning_fabric(self, config: Any) -> None:
        """Without a FusionBench program: one device (``accelerator``, ``precision``)."""
        if self._fabric_instance is None:
            import lightning as L

            self._fabric_instance = L.Fabric(
                accelerator=self.accelerator, devices=1, precision=self.precision
            )
            self._fabric_instance.launch()

    def _load(self, modelpool: BaseModelPool | nn.Module) -> tuple[nn.Module, Any]:
        if isinstance(modelpool, nn.Module):
            model, tokenizer = modelpool, None
        else:
            model = modelpool.load_model("_pretrained_")
            tokenizer = (
                modelpool.load_tokenizer() if getattr(modelpool, "tokenizer", None) else None
            )
        if tokenizer is None and self.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        if tokenizer is None:
            raise ValueError(
                "moe_ct_training needs a tokenizer: set `tokenizer:` in the model pool or the "
                "method's `tokenizer: <directory>`."
            )
        return model, tokenizer

    def _check_settings(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; valid: {', '.join(STAGES)}.")
        for name in ("batch_size", "seq_len", "accumulate_grad_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if int(self.max_steps) <= 0 and int(self.max_epochs) <= 0:
            raise ValueError("Set max_steps or max_epochs (both are <= 0: training would not end).")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}."
            )
        if self.stage == "router_then_experts" and int(self.router_warmup_steps) < 1:
            raise ValueError("stage router_then_experts needs router_warmup_steps >= 1.")
        if self.ckpt_path and not (Path(self.ckpt_path) / MARKER_FILE).is_file():
            raise FileNotFoundError(
                f"ckpt_path={self.ckpt_path} is not a complete moe_ct_training step checkpoint "
                f"(no {MARKER_FILE}); give a step-NNNNNN directory under checkpoint_dir."
            )

    @staticmethod
    def _check_vocabulary(model: nn.Module, tokenizer: Any, windows: torch.Tensor) -> None:
        rows = model.get_input_embeddings().weight.shape[0]
        largest = int(windows.max())
        if len(tokenizer) > rows or largest >= rows:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens (largest id in the data: {largest}) "
                f"but the model's embedding has {rows} rows: the tokenizer does not belong to "
                "this model; use the tokenizer the model was built with."
            )

    def _sources(self, value: Any) -> dict[str, Any]:
        value = to_plain(value)
        if isinstance(value, Mapping):
            return dict(value)
        return {f"source{i}": spec for i, spec in enumerate(value or [])}

    def _total_steps(self, steps_per_epoch: int) -> int:
        limits = []
        if int(self.max_steps) > 0:
            limits.append(int(self.max_steps))
        if int(self.max_epochs) > 0:
            limits.append(int(self.max_epochs) * steps_per_epoch)
        return min(limits)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        from fusion_bench.utils import instantiate

        config = to_plain(self.optimizer)
        if config is None:
            return torch.optim.AdamW(params, lr=float(self.learning_rate), weight_decay=0.0)
        return instantiate(config, params)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total: int) -> Any:
        from fusion_bench.optim.lr_scheduler import CosineDecayWithWarmup
        from fusion_bench.utils import instantiate

        config = to_plain(self.lr_scheduler)
        if config == "constant":
            return None
        if config is None:
            return CosineDecayWithWarmup(
                optimizer,
                T_max=total,
                max_lr=float(self.learning_rate),
                min_lr=float(self.min_learning_rate),
                warmup_steps=int(self.warmup_steps),
            )
        config = {k: (total if v == "_T_max_" else v) for k, v in config.items()}
        return instantiate(config, optimizer=optimizer)

    # ------------------------------------------------------------------ run
    def run(self, modelpool: BaseModelPool | nn.Module) -> nn.Module:
        """Train the pool's ``_pretrained_`` MoE and return it (also saved when asked)."""
        self._check_settings()
        model, tokenizer = self._load(modelpool)
        plan = self._plan(model)
        fsdp = _is_fsdp(self.fabric)
        if fsdp and self.eval_sources:
            raise ValueError(
                "Evaluation during training (eval_sources) is not supported under FSDP yet; "
                "evaluate the saved checkpoint with taskpool=moe_text_perplexity instead."
            )
        if self.save_checkpoint:
            check_destination(self.save_checkpoint, self.overwrite)
        windows, sampler, steps_per_epoch, total = self._data(model, tokenizer, plan)
        evaluator = self._evaluator(tokenizer)
        set_model_aux_coefficient(model, 0.0)  # the loop adds the (ramped) aux loss itself
        model, optimizer, scheduler, loader, experts, trainable_names = self._setup(
            model, plan, windows, sampler, total
        )
        position = {"step": 0, "epoch": 0, "skip": 0}
        self.history, self.evaluations = [], []
        if self.ckpt_path:
            position = self._resume(model, optimizer, scheduler, trainable_names)
        elif evaluator is not None:
            self._evaluate(evaluator, model, 0)

        self._train(
            model, optimizer, scheduler, loader, sampler, plan, AnchorGuard(plan), experts,
            position, total, steps_per_epoch, evaluator, tokenizer, trainable_names, fsdp,
        )  # fmt: skip
        return self._finish(model, tokenizer, fsdp)

    def _plan(self, model: nn.Module) -> TrainingPlan:
        record = moe_ct_record(model) or {}
        anchors = (
            list(self.anchor_experts)
            if self.anchor_experts is not None
            else list(record.get("anchor_experts", []))
        )
        return plan_training(model, self.stage, anchors)

    def _data(
        self, model: nn.Module, tokenizer: Any, plan: TrainingPlan
    ) -> tuple[torch.Tensor, WindowBatchSampler, int, int]:
        """Windows, this rank's batch sampler, optimiser steps per epoch and in all."""
        fabric = self.fabric
        windows, per_source = load_windows(
            tokenizer,
            self._sources(self.train_sources),
            int(self.seq_len),
            self.max_tokens_per_source,
        )
        self._check_vocabulary(model, tokenizer, windows)
        sampler = WindowBatchSampler(
            len(windows),
            int(self.batch_size),
            fabric.world_size,
            fabric.global_rank,
            seed=int(self.seed),
        )
        accumulate = int(self.accumulate_grad_batches)
        steps_per_epoch = sampler.num_batches // accumulate
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(windows)} windows give {sampler.num_batches} micro-batches per process, "
                f"fewer than accumulate_grad_batches={accumulate}; add text or lower the batch."
            )
        total = self._total_steps(steps_per_epoch)
        if fabric.is_global_zero:
            log.info(
                "moe_ct_training: stage %s, %d steps (%d per epoch) x %d processes x %d "
                "micro-batches x %d windows of %d tokens; windows per source %s; anchors %s frozen",
                self.stage,
                total,
                steps_per_epoch,
                fabric.world_size,
                accumulate,
                int(self.batch_size),
                int(self.seq_len),
                per_source,
                plan.anchors or "none",
            )
        return windows, sampler, steps_per_epoch, total

    def _setup(
        self,
        model: nn.Module,
        plan: TrainingPlan,
        windows: torch.Tensor,
        sampler: WindowBatchSampler,
        total: int,
    ) -> tuple[Any, Any, Any, Any, list[nn.Parameter], set[str]]:
        """Freeze for the stage, then hand model, optimiser and loader to Fabric."""
        fabric = self.fabric
        trainable = apply_requires_grad(model, plan, self.stage)
        if fabric.is_global_zero:
            log.info(
                "Trainable parameters: %d of %d",
                sum(p.numel() for p in trainable),
                sum(p.numel() for p in model.parameters()),
            )
        names = {id(p): n for n, p in model.named_parameters()}
        expert_names = {names[id(p)] for p in plan.experts}
        trainable_names = {names[id(p)] for p in trainable}
        model = fabric.setup_module(model)
        optimizer = self._optimizer([p for p in model.parameters() if p.requires_grad])
        optimizer = fabric.setup_optimizers(optimizer)
        scheduler = self._scheduler(optimizer, total)
        loader = fabric.setup_dataloaders(
            DataLoader(WindowDataset(windows), batch_sampler=sampler),
            use_distributed_sampler=False,
        )
        # names again: Fabric's wrappers may have replaced the parameter objects
        experts = [p for n, p in model.named_parameters() if _clean_name(n) in expert_names]
        return model, optimizer, scheduler, loader, experts, trainable_names

    def _finish(self, model: Any, tokenizer: Any, fsdp: bool) -> nn.Module:
        """Unfreeze, record the run in the config, save and plot."""
        fabric = self.fabric
        module = model.module if hasattr(model, "module") else model
        module.eval()
        for param in module.parameters():
            param.requires_grad_(True)
        set_model_aux_coefficient(module, float(self.router_aux_loss_coef))
        module.config.moe_ct_training = {
            "params": {
                k: to_plain(getattr(self, k))
                for k in self._config_mapping.values()
                if not k.startswith("_")
            },
            "final": {k: v for k, v in self.history[-1].items() if k != "layers"}
            if self.history
            else {},
        }
        if self.save_checkpoint:
            self._save_model(model, tokenizer, Path(self.save_checkpoint), fsdp)
            if fabric.is_global_zero:
                plot_training_history(
                    self.history,
                    self.evaluations,
                    Path(self.save_checkpoint) / "training_history.png",
                    title=f"moe_ct_training ({self.stage})",
                )
        if self.log_dir is not None and fabric.is_global_zero:
            plot_training_history(
                self.history, self.evaluations, Path(self.log_dir) / "training_history.png"
            )
        return module

    # ------------------------------------------------------------------ loop
    def _train(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        loader: Any,
        sampler: WindowBatchSampler,
        plan: TrainingPlan,
        guard: AnchorGuard,
        experts: list[nn.Parameter],
        position: dict[str, int],
        total: int,
        steps_per_epoch: int,
        evaluator: Any,
        tokenizer: Any,
        trainable_names: set[str],
        fsdp: bool,
    ) -> None:
        accumulate = int(self.accumulate_grad_batches)
        step, epoch, skip = position["step"], position["epoch"], position["skip"]
        model.train()
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"moe_ct_training ({self.stage})",
            disable=not self.fabric.is_global_zero,
            dynamic_ncols=True,
        )
        while step < total:
            sampler.set_epoch(epoch, skip)
            micro = skip
            stats, started = self._new_stats(plan), time.perf_counter()
            for batch in loader:
                micro += 1
                accumulating = micro % accumulate != 0
                coef = aux_loss_coefficient(
                    step, float(self.router_aux_loss_coef), int(self.aux_loss_ramp_steps)
                )
                with self.fabric.no_backward_sync(model, enabled=accumulating):
                    loss = self._forward(model, batch, coef, stats)
                    self.fabric.backward(loss / accumulate)
                if accumulating:
                    continue
                self._optimizer_step(model, optimizer, scheduler, guard, experts, step, fsdp)
                step += 1
                record = self._finish_stats(
                    stats, step, coef, optimizer, time.perf_counter() - started
                )
                self._report(record, bar)
                done_epoch = micro >= steps_per_epoch * accumulate
                self._periodic(
                    model, optimizer, scheduler, evaluator, tokenizer, trainable_names, fsdp, total,
                    {"step": step, "epoch": epoch + done_epoch, "skip": 0 if done_epoch else micro},
                )  # fmt: skip
                stats, started = self._new_stats(plan), time.perf_counter()
                if step >= total or done_epoch:
                    break
            epoch, skip = epoch + 1, 0
        bar.close()

    def _periodic(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        evaluator: Any,
        tokenizer: Any,
        trainable_names: set[str],
        fsdp: bool,
        total: int,
        position: dict[str, int],
    ) -> None:
        """Evaluation and resumable checkpoints when their step comes."""
        step = position["step"]
        every = int(self.eval_every)
        if evaluator is not None and (step == total or (every > 0 and step % every == 0)):
            self._evaluate(evaluator, model, step)
        if int(self.checkpoint_every) > 0 and step % int(self.checkpoint_every) == 0:
            self._save_step(model, optimizer, scheduler, tokenizer, position, trainable_names, fsdp)

    def _optimizer_step(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        guard: AnchorGuard,
        experts: list[nn.Parameter],
        step: int,
        fsdp: bool,
    ) -> None:
        """One update from the accumulated gradients; anchors come back unchanged."""
        module = model.module if hasattr(model, "module") else model
        if self.stage == "router_then_experts" and step < int(self.router_warmup_steps):
            for param in experts:  # router warm-up: experts get no update
                param.grad = None
        if not fsdp:
            guard.zero_grads(module)
        if self.gradient_clip_val:
            self.clip_gradients_if_needed(model, optimizer)
        torch_scheduler = isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        if scheduler is not None and not torch_scheduler:
            scheduler.step()  # FusionBench's schedulers set this step's rate
        optimizer.step()
        if torch_scheduler:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        guard.restore(module, model._forward_module if fsdp else None)

    def _report(self, record: dict[str, Any], bar: Any) -> None:
        self.history.append(record)
        step = record["step"]
        self.fabric.log_dict(  # None: a metric without meaning here (no anchors)
            {f"train/{k}": v for k, v in record.items() if k != "step" and v is not None},
            step=step,
        )
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if step % max(int(self.log_every), 1) == 0 or step == 1:
            self._log_line(record)

    def _forward(
        self, model: Any, batch: torch.Tensor, coef: float, stats: dict[str, Any]
    ) -> torch.Tensor:
        out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        lm_loss = out.loss
        aux = getattr(out, "aux_loss", None)
        loss = lm_loss
        if aux is not None and coef:
            loss = loss + coef * aux.to(loss.device)
        z = None
        if float(self.router_z_loss_coef):
            z = router_z_loss(out.router_logits)
            loss = loss + float(self.router_z_loss_coef) * z.to(loss.device)
        stats["sums"] += torch.tensor(
            [
                float(loss.detach()),
                float(lm_loss.detach()),
                float(aux.detach()) if aux is not None else 0.0,
                float(z.detach()) if z is not None else 0.0,
                1.0,
                float(batch.numel()),
            ],
            dtype=torch.float64,
        )
        stats["routing"].update([logits.detach().float().cpu() for logits in out.router_logits])
        return loss

    def _new_stats(self, plan: TrainingPlan) -> dict[str, Any]:
        info = plan.info
        return {
            "sums": torch.zeros(6, dtype=torch.float64),
            "routing": RoutingAccumulator(len(info.moe_layers), info.num_experts, info.top_k),
            "anchors": plan.anchors,
        }

    def _finish_stats(
        self, stats: dict[str, Any], step: int, coef: float, optimizer: Any, seconds: float
    ) -> dict[str, Any]:
        fabric = self.fabric
        routing: RoutingAccumulator = stats["routing"]
        packed = torch.cat(
            [
                stats["sums"],
                torch.tensor([*routing.entropy_sums, routing.num_tokens], dtype=torch.float64),
                routing.counts.flatten().double(),
            ]
        )
        if fabric.world_size > 1:  # every rank's micro-batches count
            packed = fabric.all_reduce(fabric.to_device(packed), reduce_op="sum").cpu()
        sums, rest = packed[:6], packed[6:]
        layers = routing.counts.shape[0]
        routing.entropy_sums = rest[:layers].tolist()
        routing.num_tokens = int(rest[layers])
        routing.counts = rest[layers + 1 :].round().long().view_as(routing.counts)
        summary = summarize_layers(routing.layer_reports(anchors=stats["anchors"]))
        count = float(sums[4])
        return {
            "step": step,
            "loss": float(sums[0]) / count,
            "lm_loss": float(sums[1]) / count,
            "aux_loss": float(sums[2]) / count,
            "z_loss": float(sums[3]) / count,
            "aux_coef": coef,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "tokens_per_s": float(sums[5]) / max(seconds, 1e-9),
            **{k: summary[k] for k in BALANCE_KEYS},
        }

    @staticmethod
    def _log_line(h: Mapping[str, Any]) -> None:
        log.info(
            "step %d: loss %.4f (lm %.4f, aux %.4f) lr %.2e cv %.3f maxvio %.3f entropy %.3f "
            "dead %d anchor share %s, %.0f tokens/s",
            h["step"],
            h["loss"],
            h["lm_loss"],
            h["aux_loss"],
            h["lr"],
            h["mean_cv"],
            h["mean_max_violation"],
            h["mean_router_entropy"],
            h["dead_experts"],
            "-" if h["mean_anchor_share"] is None else f"{h['mean_anchor_share']:.3f}",
            h["tokens_per_s"],
        )

    # ------------------------------------------------------------------ evaluation
    def _evaluator(self, tokenizer: Any) -> Any:
        sources = self._sources(self.eval_sources)
        if not sources:
            return None
        from ..eval.taskpool import MoETextTaskPool

        pool = MoETextTaskPool(
            sources=sources,
            max_tokens_per_source=int(self.eval_max_tokens_per_source),
            window_length=int(self.seq_len),
            batch_size=int(self.eval_batch_size),
            reference_models=[],
            plots=False,
            show_progress=False,
        )
        pool._tokenizer_obj = tokenizer
        pool.load_windows(tokenizer)  # bad sources fail before training
        return pool

    def _evaluate(self, evaluator: Any, model: Any, step: int) -> None:
        """Held-out perplexity and routing on rank 0 (the other ranks wait)."""
        fabric = self.fabric
        if fabric.is_global_zero:
            module = model.module if hasattr(model, "module") else model
            report = evaluator.evaluate_model(module, label=f"step {step}")
            routing = report.get("routing") or {}
            overall = routing.get("overall") or {}
            entry = {
                "step": step,
                "perplexity": report["perplexity"],
                "overall_perplexity": report["overall_perplexity"],
                **{k: overall.get(k) for k in BALANCE_KEYS},
                "per_source_shares": routing.get("per_source_shares"),
            }
            self.evaluations.append(entry)
            fabric.log_dict(
                {
                    "eval/overall_perplexity": entry["overall_perplexity"],
                    **{f"eval/perplexity/{k}": v for k, v in entry["perplexity"].items()},
                    **{
                        f"eval/{k}": v
                        for k, v in entry.items()
                        if k in BALANCE_KEYS and v is not None
                    },
                },
                step=step,
            )
            log.info(
                "eval at step %d: perplexity %s",
                step,
                ", ".join(f"{k} {v:.2f}" for k, v in entry["perplexity"].items()),
            )
        fabric.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _history_json(self) -> str:
        return json.dumps({"train": self.history, "eval": self.evaluations}, indent=1)

    def _save_model(self, model: Any, tokenizer: Any, directory: Path, fsdp: bool) -> None:
        fabric = self.fabric
        module = model.module if hasattr(model, "module") else model
        state_dict = None
        if fsdp:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FSDP.state_dict_type(model._forward_module, StateDictType.FULL_STATE_DICT, config):
                state_dict = model._forward_module.state_dict()
            state_dict = {_clean_name(k): v for k, v in state_dict.items()}
        if fabric.is_global_zero:
            write_checkpoint(
                module,
                directory,
                tokenizer,
                overwrite=True,
                extra_files={"training_history.json": self._history_json()},
                state_dict=state_dict,
            )
        fabric.barrier()

    def _checkpoint_root(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        if self.save_checkpoint:
            target = Path(self.save_checkpoint).expanduser().absolute()
            return target.with_name(target.name + "-checkpoints")
        raise ValueError("checkpoint_every needs checkpoint_dir or save_checkpoint.")

    def _save_step(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        tokenizer: Any,
        position: dict[str, int],
        trainable_names: set[str],
        fsdp: bool,
    ) -> None:
        fabric = self.fabric
        directory = self._checkpoint_root() / f"step-{position['step']:06d}"
        self._save_model(model, tokenizer, directory, fsdp)
        trainer = {
            **position,
            "world_size": fabric.world_size,
            "accumulate_grad_batches": int(self.accumulate_grad_batches),
            "batch_size": int(self.batch_size),
            "scheduler": _scheduler_state(scheduler),
            "history": self.history,
            "evaluations": self.evaluations,
        }
        fabric.save(
            directory / STATE_FILE,
            {"model": model, "optimizer": optimizer, "trainer": trainer},
            filter=None if fsdp else {"model": lambda k, _: k in trainable_names},
        )
        torch.save(_rng_state(), directory / f"rng-rank{fabric.global_rank}.pt")
        fabric.barrier()
        if fabric.is_global_zero:
            (directory / MARKER_FILE).write_text(json.dumps(position) + "\n")
            log.info("Resumable checkpoint at step %d: %s", position["step"], directory)
        fabric.barrier()

    def _resume(
        self, model: Any, optimizer: Any, scheduler: Any, trainable_names: set[str]
    ) -> dict[str, int]:
        fabric = self.fabric
        directory = Path(self.ckpt_path)
        remainder = fabric.load(
            directory / STATE_FILE, {"model": model, "optimizer": optimizer}, strict=False
        )
        trainer = remainder["trainer"]
        expected = {
            "world_size": fabric.world_size,
            "accumulate_grad_batches": int(self.accumulate_grad_batches),
            "batch_size": int(self.batch_size),
        }
        differs = {k: (trainer[k], v) for k, v in expected.items() if trainer[k] != v}
        if differs:
            raise ValueError(
                f"ckpt_path={directory} was written with a different batch layout "
                f"(checkpoint, now): {differs}; resume with the same processes and batch."
            )
        _load_scheduler_state(scheduler, trainer["scheduler"])
        rng = directory / f"rng-rank{fabric.global_rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        self.history = list(trainer["history"])
        self.evaluations = list(trainer["evaluations"])
        if fabric.is_global_zero:
            log.info("Resumed from %s at step %d", directory, trainer["step"])
        return {k: int(trainer[k]) for k in ("step", "epoch", "skip")}

    # the mixin's epoch hook: this loop runs whole epochs in ``_train``
    def train_epoch(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        raise NotImplementedError("MoECTTrainingAlgorithm trains in run().")
