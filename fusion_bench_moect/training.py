"""``MoECTTrainingAlgorithm`` (``method=moe_ct_training``): continual training of an upcycled MoE.

Stage ``router`` trains only the routers (a warm-up); stage ``experts`` trains the routers and
the non-anchor experts. The anchor experts (``config.moe_ct.anchor_experts``), the Qwen2-MoE
shared expert and every non-FFN weight stay frozen, bit for bit. The architecture's
load-balancing auxiliary loss is on, and every step logs the routing balance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
from torch import nn
from tqdm.auto import tqdm

from ._config import to_plain
from .eval.moe import describe_moe, moe_ct_record
from .eval.routing import RoutingAccumulator, summarize_layers
from .eval.text import load_source
from .io.checkpoint import check_destination, save_checkpoint

log = logging.getLogger(__name__)

STAGES = ("router", "experts")


def token_windows(
    tokenizer: Any, texts: Sequence[str], seq_len: int, max_tokens: int | None
) -> torch.Tensor:
    """Concatenate tokenised texts (EOS between documents) and cut (N, seq_len) windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(
            f"The training text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
            "add text or lower seq_len."
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def expert_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
    """Every routed-expert parameter with its expert index (None when it stacks all experts)."""
    info = describe_moe(model)
    found: list[tuple[nn.Parameter, int | None]] = []
    for layer_idx in info.moe_layers:
        layer = model.model.layers[layer_idx]
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):
            found += [(experts.gate_up_proj, None), (experts.down_proj, None)]
        else:
            for j, expert in enumerate(experts):
                found += [(p, j) for p in expert.parameters()]
    return found


def freeze_for_stage(
    model: nn.Module, stage: str, anchors: Sequence[int]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Set ``requires_grad`` for ``stage``; return (stacked parameter, anchor index) pairs whose
    anchor rows must be restored after every optimiser step."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; valid: {', '.join(STAGES)}.")
    info = describe_moe(model)
    if info is None:
        raise ValueError("moe_ct_training needs an MoE model (Mixtral, Qwen2-MoE or Qwen3-MoE).")
    for param in model.parameters():
        param.requires_grad_(False)
    for router in info.routers:
        router.weight.requires_grad_(True)
    pinned = []
    if stage == "experts":
        index = torch.tensor(sorted(anchors), dtype=torch.long)
        for param, expert in expert_parameters(model):
            if expert is None:
                param.requires_grad_(True)
                if len(index):
                    pinned.append((param, index))
            elif expert not in anchors:
                param.requires_grad_(True)
    return pinned


@auto_register_config
class MoECTTrainingAlgorithm(BaseAlgorithm):
    """Continue training an MoE made by ``moe_ct_upcycling`` on user text, with Lightning Fabric.

    Args:
        train_sources: Named text sources (paths, globs, ``{debian_reference: de, split: train}``
            mappings, ``{text: ...}``), as a mapping name -> source or a list.
        stage: ``router`` (routers only) or ``experts`` (routers + non-anchor experts).
        max_steps: Optimiser steps.
        learning_rate: AdamW learning rate (no weight decay, so frozen slices stay exact).
        batch_size: Windows per step.
        seq_len: Tokens per window.
        router_aux_loss_coef: Weight of the load-balancing auxiliary loss.
        max_tokens_per_source: Cap on tokens read from each source (null = all).
        gradient_clip: Max gradient norm (0 = off).
        seed: Seed of batch sampling.
        log_every: Steps between balance-metric log lines.
        checkpoint_every: Steps between checkpoints into ``save_checkpoint`` (0 = only at the end).
        save_checkpoint: Directory of the trained checkpoint (with ``training_history.json``).
        overwrite: Replace a non-empty ``save_checkpoint``.
        accelerator: Lightning Fabric accelerator (``auto`` uses a GPU when there is one).
        precision: Fabric precision, e.g. ``32-true`` or ``bf16-mixed``.
        tokenizer: Tokenizer directory, used when the pool has no tokenizer or ``run`` is
            given a model object.
    """

    def __init__(
        self,
        train_sources: Mapping[str, Any] | Sequence[Any] = (),
        stage: str = "router",
        max_steps: int = 50,
        learning_rate: float = 1e-4,
        batch_size: int = 4,
        seq_len: int = 256,
        router_aux_loss_coef: float = 0.01,
        max_tokens_per_source: int | None = 200_000,
        gradient_clip: float = 1.0,
        seed: int = 0,
        log_every: int = 10,
        checkpoint_every: int = 0,
        save_checkpoint: str | None = None,
        overwrite: bool = False,
        accelerator: str = "auto",
        precision: str = "32-true",
        tokenizer: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []

    def run(self, modelpool: BaseModelPool | nn.Module) -> nn.Module:
        """Train the pool's ``_pretrained_`` MoE and return it (also saved when asked)."""
        import lightning as L

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
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}; valid: {', '.join(STAGES)}.")
        if self.save_checkpoint:
            check_destination(self.save_checkpoint, self.overwrite)
        record = moe_ct_record(model) or {}
        anchors = list(record.get("anchor_experts", []))
        info = describe_moe(model)
        windows = self._windows(tokenizer)
        log.info(
            "moe_ct_training: stage %s, %d steps x %d windows of %d tokens (%d windows available), "
            "anchors %s frozen",
            self.stage,
            self.max_steps,
            self.batch_size,
            self.seq_len,
            len(windows),
            anchors or "none",
        )

        model.config.router_aux_loss_coef = float(self.router_aux_loss_coef)
        pinned = freeze_for_stage(model, self.stage, anchors)
        anchor_values = [(p, idx, p.detach()[idx].clone()) for p, idx in pinned]
        trainable = [p for p in model.parameters() if p.requires_grad]
        log.info(
            "Trainable parameters: %d of %d",
            sum(p.numel() for p in trainable),
            sum(p.numel() for p in model.parameters()),
        )

        fabric = L.Fabric(accelerator=self.accelerator, devices=1, precision=self.precision)
        optimizer = torch.optim.AdamW(trainable, lr=self.learning_rate, weight_decay=0.0)
        model, optimizer = fabric.setup(model, optimizer)
        model.train()
        gen = torch.Generator().manual_seed(int(self.seed))
        self.history = []
        for step in tqdm(range(1, int(self.max_steps) + 1), desc=f"moe_ct_training ({self.stage})"):
            batch = windows[torch.randint(len(windows), (int(self.batch_size),), generator=gen)]
            batch = fabric.to_device(batch)
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            fabric.backward(out.loss)
            for param, idx, _ in anchor_values:  # anchors get no update signal at all
                if param.grad is not None:
                    param.grad[idx] = 0
            if self.gradient_clip:
                fabric.clip_gradients(model, optimizer, max_norm=float(self.gradient_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for param, idx, value in anchor_values:
                    param[idx] = value.to(param.device)
            self.history.append(self._metrics(step, out, info, anchors))
            if step % max(int(self.log_every), 1) == 0 or step == 1:
                h = self.history[-1]
                log.info(
                    "step %d: loss %.4f (lm %.4f, aux %.4f) cv %.3f maxvio %.3f entropy %.3f dead %d",
                    step,
                    h["loss"],
                    h["lm_loss"],
                    h["aux_loss"],
                    h["mean_cv"],
                    h["mean_max_violation"],
                    h["mean_router_entropy"],
                    h["dead_experts"],
                )
            if (
                self.save_checkpoint
                and self.checkpoint_every
                and step % int(self.checkpoint_every) == 0
            ):
                self._save(model, tokenizer, step)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(True)
        module = model.module if hasattr(model, "module") else model
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
            self._save(module, tokenizer, int(self.max_steps))
        return module

    def _windows(self, tokenizer: Any) -> torch.Tensor:
        sources = to_plain(self.train_sources)
        items = list(sources.values()) if isinstance(sources, Mapping) else list(sources or [])
        if not items:
            raise ValueError(
                "moe_ct_training needs train_sources (files, globs or debian_reference)."
            )
        texts = []
        for spec in items:
            docs = load_source(spec)
            per_source = token_windows(
                tokenizer, [d.text for d in docs], int(self.seq_len), self.max_tokens_per_source
            )
            texts.append(per_source)
        return torch.cat(texts)

    def _metrics(self, step: int, out: Any, info: Any, anchors: list[int]) -> dict[str, Any]:
        acc = RoutingAccumulator(len(out.router_logits), info.num_experts, info.top_k)
        acc.update([logits.detach().float().cpu() for logits in out.router_logits])
        summary = summarize_layers(acc.layer_reports(anchors=anchors))
        aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else 0.0
        loss = float(out.loss.detach())
        return {
            "step": step,
            "loss": loss,
            "aux_loss": aux,
            "lm_loss": loss - float(self.router_aux_loss_coef) * aux,
            **{
                k: summary[k]
                for k in (
                    "mean_cv",
                    "mean_max_violation",
                    "mean_router_entropy",
                    "dead_experts",
                    "mean_anchor_share",
                )
            },
        }

    def _save(self, model: nn.Module, tokenizer: Any, step: int) -> None:
        module = model.module if hasattr(model, "module") else model
        # the destination was checked at the start; later saves replace our own earlier ones
        target = save_checkpoint(
            module,
            self.save_checkpoint,
            tokenizer,
            overwrite=True,
            extra_files={"training_history.json": json.dumps(self.history, indent=1)},
        )
        log.info("Checkpoint at step %d: %s", step, target)
