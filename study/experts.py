"""Language experts for the MoE-CT study: SmolLM2-135M fine-tuned on one language each.

Each expert is the dense base model fine-tuned with Lightning Fabric on the **train**
split of the Debian Reference in its language (``load_debian_reference(lang, "train")``;
the held-out chapters 4, 8 and 12 are never trained on). By default only the FFN (MLP)
weights train (the part MoE-CT takes from an expert), hard enough (150 steps at lr 1e-3)
that each expert gains a lot on its language and forgets English, in about 8 minutes on a
2-core CPU; Fabric uses a GPU when there is one (``--accelerator auto``).

Every expert is a Hugging Face directory with the tokenizer,
``$FUSION_BENCH_MOECT_CACHE/experts/smollm2-<lang>``, written atomically (temp dir +
rename), with a marker ``moect_expert.json`` recording the settings, the base model, the
training losses and the held-out perplexity of the base and of the expert on the expert's
own language and on English (in-domain and out-of-domain: the forgetting). A run whose marker matches the requested settings does nothing (``--force``
rebuilds).

Usage::

    python -m study --parts experts [--langs de,fr,es] [--steps 150] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusion_bench_moect.paths import cache_root

log = logging.getLogger(__name__)

MARKER = "moect_expert.json"
MARKER_FORMAT = 2
DEFAULT_LANGS = ("de", "fr", "es")
TRAIN_TARGETS = ("mlp", "all")


def base_model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct directory (``python -m fusion_bench_moect.cli.smollm2``)."""
    return cache_root() / "SmolLM2-135M-Instruct"


def expert_dir(lang: str, root: str | os.PathLike | None = None) -> Path:
    """Where the expert for ``lang`` lives: ``<cache>/experts/smollm2-<lang>``."""
    return (Path(root) if root is not None else cache_root() / "experts") / f"smollm2-{lang}"


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
    """Fine-tuning settings of one language expert (all recorded in the marker).

    Attributes:
        steps: Optimiser steps.
        batch_size: Windows per step.
        seq_len: Tokens per window.
        learning_rate: AdamW learning rate (constant after a short linear warm-up).
        warmup_steps: Linear warm-up steps.
        train_target: ``mlp`` (FFN weights only) or ``all`` (every weight).
        max_train_tokens: Cap on training tokens read from the train split.
        eval_tokens: Held-out tokens of the expert's language used for the before/after
            perplexity in the marker.
        seed: Seed of batch sampling.
        dtype: Dtype the expert is saved in (the base is stored in bfloat16).
    """

    steps: int = 150
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    train_target: str = "mlp"
    max_train_tokens: int = 200_000
    eval_tokens: int = 2048
    seed: int = 0
    dtype: str = "bfloat16"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_built(lang: str, settings: ExpertSettings, root: str | os.PathLike | None = None) -> bool:
    """Whether the expert for ``lang`` exists with exactly ``settings``."""
    marker = _read_marker(expert_dir(lang, root))
    return (
        marker is not None
        and marker.get("format") == MARKER_FORMAT
        and marker.get("language") == lang
        and marker.get("settings") == dataclasses.asdict(settings)
    )


def heldout_perplexities(
    model: torch.nn.Module, tokenizer_dir: str | os.PathLike, lang: str, tokens: int
) -> dict[str, float]:
    """Perplexity of ``model`` on the first ``tokens`` held-out tokens of ``lang`` and of
    the two English texts (``en``: held-out Debian Reference, in-domain; ``en_gpl3``:
    Debian's GPL-3, out-of-domain), through the package's ``MoETextTaskPool``."""
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

    from .grid import heldout_sources

    pool = MoETextTaskPool(
        sources=heldout_sources([lang, "en"]),
        max_tokens_per_source=tokens,
        window_length=256,
        batch_size=4,
        tokenizer=str(tokenizer_dir),
        reference_models=[],
        plots=False,
        show_progress=False,
    )
    return {k: float(v) for k, v in pool.evaluate_model(model, label=lang)["perplexity"].items()}


def _trainable(model: torch.nn.Module, target: str) -> list[torch.nn.Parameter]:
    if target not in TRAIN_TARGETS:
        raise ValueError(f"Unknown train_target {target!r}; valid: {', '.join(TRAIN_TARGETS)}.")
    params = []
    for name, param in model.named_parameters():
        train = target == "all" or ".mlp." in name
        param.requires_grad_(train)
        if train:
            params.append(param)
    return params


def train_expert(
    lang: str,
    settings: ExpertSettings = ExpertSettings(),
    base_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    accelerator: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune the base on ``lang`` (train split) and save the expert; return its marker.

    Does nothing (returns the existing marker) when the expert is already built with the
    same settings, unless ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = expert_dir(lang, root)
    if not force and is_built(lang, settings, root):
        log.info("Expert %s is up to date: %s", lang, target)
        return _read_marker(target)  # type: ignore[return-value]
    base_dir = _checked_base_dir(base_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    windows = _train_windows(lang, tokenizer, settings)
    ppl_before = heldout_perplexities(model, base_dir, lang, settings.eval_tokens)

    trainable = _trainable(model, settings.train_target)
    module, losses, train_seconds, device = _fine_tune(
        model, trainable, windows, settings, accelerator, lang
    )
    ppl_after = heldout_perplexities(module, base_dir, lang, settings.eval_tokens)
    marker = {
        "format": MARKER_FORMAT,
        "language": lang,
        "settings": dataclasses.asdict(settings),
        "base_model": str(base_dir),
        "train_split": "train",
        "train_windows": len(windows),
        "trainable_parameters": sum(p.numel() for p in trainable),
        **_loss_summary(losses),
        "heldout_tokens": settings.eval_tokens,
        **_perplexity_entries(lang, ppl_before, ppl_after),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        "accelerator": device,
    }
    _save_atomically(module, tokenizer, target, marker)
    log.info(
        "Expert %s saved to %s: held-out ppl %.3f -> %.3f (%.1f%%), English forgetting %s, %.0f s",
        lang,
        target,
        ppl_before[lang],
        ppl_after[lang],
        100 * marker["heldout_perplexity_change"],
        ", ".join(f"{k} {100 * v:+.1f}%" for k, v in marker["english_forgetting"].items()),
        marker["seconds"],
    )
    return marker


def _perplexity_entries(
    lang: str, before: Mapping[str, float], after: Mapping[str, float]
) -> dict[str, Any]:
    """The marker's held-out perplexities of the base (``before``) and of the expert, on its
    own language and on the English texts (forgetting > 0: the expert is worse)."""
    return {
        "heldout_perplexity_base": before[lang],
        "heldout_perplexity_expert": after[lang],
        "heldout_perplexity_change": after[lang] / before[lang] - 1.0,
        "english_perplexity_base": {k: v for k, v in before.items() if k != lang},
        "english_perplexity_expert": {k: v for k, v in after.items() if k != lang},
        "english_forgetting": {k: after[k] / v - 1.0 for k, v in before.items() if k != lang},
    }


def _train_windows(lang: str, tokenizer: Any, settings: ExpertSettings) -> torch.Tensor:
    """Token windows of the train split of the Debian Reference in ``lang``."""
    from fusion_bench_moect.data.text import load_debian_reference
    from fusion_bench_moect.training import token_windows

    docs = load_debian_reference(lang, split="train")
    windows = token_windows(
        tokenizer, [d.text for d in docs], settings.seq_len, settings.max_train_tokens
    )
    log.info("Expert %s: %d training windows of %d tokens", lang, len(windows), settings.seq_len)
    return windows


def _checked_base_dir(base_dir: str | os.PathLike | None) -> Path:
    base_dir = Path(base_dir) if base_dir is not None else base_model_dir()
    if not (base_dir / "config.json").exists():
        raise FileNotFoundError(
            f"No base model at {base_dir}; prepare it with: python -m fusion_bench_moect.cli.smollm2"
        )
    return base_dir


def _loss_summary(losses: list[float]) -> dict[str, Any]:
    return {
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last10_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }


def _fine_tune(
    model: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    windows: torch.Tensor,
    settings: ExpertSettings,
    accelerator: str,
    lang: str,
) -> tuple[torch.nn.Module, list[float], float, str]:
    """Train ``trainable`` on random ``windows`` with Lightning Fabric; returns the model (on
    CPU, in ``settings.dtype``, eval mode), the losses, the seconds and the device used."""
    import lightning as L

    fabric = L.Fabric(accelerator=accelerator, devices=1, precision="32-true")
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    warm = max(int(settings.warmup_steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    model, optimizer = fabric.setup(model, optimizer)
    model.train()
    gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    train_started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        batch = windows[torch.randint(len(windows), (settings.batch_size,), generator=gen)]
        batch = fabric.to_device(batch)
        loss = model(input_ids=batch, labels=batch).loss
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == 1 or step % 10 == 0:
            elapsed = time.perf_counter() - train_started
            log.info(
                "Expert %s step %d/%d: loss %.4f (%.2f s/step)",
                lang,
                step,
                settings.steps,
                losses[-1],
                elapsed / step,
            )
    train_seconds = time.perf_counter() - train_started
    module = model.module if hasattr(model, "module") else model
    module.eval()
    module = module.to("cpu", dtype=getattr(torch, settings.dtype))
    return module, losses, train_seconds, str(fabric.device)


def _save_atomically(model: Any, tokenizer: Any, target: Path, marker: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_experts(
    langs: Sequence[str] = DEFAULT_LANGS,
    settings: ExpertSettings = ExpertSettings(),
    root: str | os.PathLike | None = None,
    accelerator: str = "auto",
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Build (or reuse) the expert of every language; return ``{lang: marker}``."""
    return {
        lang: train_expert(lang, settings, root=root, accelerator=accelerator, force=force)
        for lang in langs
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The expert options (of ``python -m study``)."""
    d = ExpertSettings()
    parser.add_argument("--langs", default=",".join(DEFAULT_LANGS), help="expert languages")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument("--train-target", choices=TRAIN_TARGETS, default=d.train_target)
    parser.add_argument("--experts-dir", default=None, help="default <cache>/experts")
    parser.add_argument("--accelerator", default="auto", help="Lightning Fabric accelerator")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")


def settings_from_args(args: argparse.Namespace) -> ExpertSettings:
    return ExpertSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        train_target=args.train_target,
    )
