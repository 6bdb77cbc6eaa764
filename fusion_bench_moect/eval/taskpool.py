"""FusionBench task pool: offline perplexity and MoE routing diagnostics on plain text."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fusion_bench import auto_register_config
from fusion_bench.taskpool import BaseTaskPool
from fusion_bench.utils import instantiate
from torch import nn
from transformers import AutoTokenizer

from fusion_bench_moect._config import to_plain
from fusion_bench_moect.arch import router_scoring
from fusion_bench_moect.data.text import load_source
from fusion_bench_moect.eval.capture import RouterCapture, needs_capture
from fusion_bench_moect.eval.plots import plot_alpha_schedule, plot_expert_load
from fusion_bench_moect.eval.routing import (
    RoutingAccumulator,
    distinct_row_condition,
    summarize_layers,
)
from fusion_bench_moect.inspection import MoEInfo, describe_moe, moe_ct_record

from ..errors import one_line_errors
from ..progress import progress

log = logging.getLogger(__name__)

__all__ = ["MoETextTaskPool", "to_jsonable"]


def without_empty_lists(value: Any) -> Any:
    """Drop dict entries whose value is an empty list (e.g. no dead experts, no anchors).

    FusionBench's report printer (``print_json``) indexes ``[0]`` of every list and crashes on
    an empty one, then dumps the whole report to the log; counts such as ``num_dead_experts``
    still say "none".
    """
    if isinstance(value, dict):
        return {k: without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [without_empty_lists(v) for v in value]
    return value


def to_jsonable(value: Any) -> Any:
    """Convert a report to plain JSON types (non-finite floats become ``None``)."""
    value = to_plain(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    return str(value)


@auto_register_config
class MoETextTaskPool(BaseTaskPool):
    """Perplexity on named text sources, plus routing-balance diagnostics for MoE models.

    For every source the model's perplexity is the exponential of the token-weighted mean
    negative log-likelihood over non-overlapping windows of ``window_length`` tokens.
    For an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE) the same forward passes also yield
    the router logits, from which the task pool reports, per layer and overall, each
    expert's load share, CV, MaxVio, normalised load and router entropies, Gini, dead
    experts, the anchor experts' share, the router condition numbers and, when the model
    carries the MoE-CT record (``config.moe_ct``), the per-layer alpha. A dense model gets
    perplexity only, so base and MoE reports line up. When run by FusionBench's
    ``FabricModelFusionProgram``, the pool's reference models (``_pretrained_`` by default)
    are evaluated too and the report gives the perplexity ratio model / reference.

    Args:
        sources: Named text sources, ``{name: spec}``; a spec is a path, folder or glob,
            or a mapping ``{debian_reference: <lang>, split: heldout|train|all}``,
            ``{path: ...}``, ``{paths: [...]}`` or ``{text: ...}``
            (see ``fusion_bench_moect.data.text.load_source``).
        max_tokens_per_source: Tokens read from each source (``None`` = all of it).
        window_length: Tokens per forward pass (including the BOS token when one is added).
        batch_size: Windows per forward pass.
        tokenizer: Tokenizer directory, or a config to instantiate; by
            default the program's model pool tokenizer, then the model's own directory.
        add_bos: Prepend the tokenizer's BOS token to every window; ``None`` = only if the
            tokenizer adds one by itself.
        reference_models: Model-pool names evaluated alongside the model (perplexity,
            plus routing if they are MoE); needs the FusionBench program. Empty to skip.
        routing_stats: Collect routing diagnostics for MoE models.
        dead_expert_threshold: An expert is dead in a layer when its share is below this
            fraction of the balanced share 1/E.
        plots: Write the PNG plots (expert load heatmap, alpha schedule).
        output_dir: Where plots go; default the program's log directory (next to
            ``program_report.json``); without either, no plots.
        show_progress: Show tqdm progress bars.
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        max_tokens_per_source: int | None = 4096,
        window_length: int = 512,
        batch_size: int = 4,
        tokenizer: str | Mapping[str, Any] | None = None,
        add_bos: bool | None = None,
        reference_models: Sequence[str] | None = ("_pretrained_",),
        routing_stats: bool = True,
        dead_expert_threshold: float = 0.1,
        plots: bool = True,
        output_dir: str | None = None,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not sources:
            raise ValueError(
                "MoETextTaskPool needs at least one text source in `sources` (on the "
                "fusion_bench command line: +taskpool.sources.NAME=PATH)."
            )
        if window_length < 2:
            raise ValueError(f"window_length must be >= 2, got {window_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_tokens_per_source is not None and max_tokens_per_source < 2:
            raise ValueError(f"max_tokens_per_source must be >= 2, got {max_tokens_per_source}.")
        self._tokenizer_obj = None
        self._windows: dict[str, list[list[int]]] | None = None
        self._reference_reports: dict[str, dict[str, Any]] = {}
        self._num_evaluations = 0

    # ------------------------------------------------------------------ inputs
    def _modelpool(self) -> Any:
        return getattr(self._program, "modelpool", None) if self._program is not None else None

    def load_tokenizer(self, model: nn.Module | None = None) -> Any:
        """The tokenizer used for every model (loaded once).

        Args:
            model: Used as a last resort: its ``config._name_or_path`` directory.

        Returns:
            A transformers tokenizer.

        Raises:
            ValueError: If no tokenizer can be found.
        """
        if self._tokenizer_obj is not None:
            return self._tokenizer_obj
        if self.tokenizer is not None:
            if isinstance(self.tokenizer, str):
                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
            else:
                tokenizer = instantiate(self.tokenizer)
        elif getattr(self._modelpool(), "tokenizer", None) is not None:
            tokenizer = self._modelpool().load_tokenizer()
        else:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name or not Path(name).is_dir():
                raise ValueError(
                    "MoETextTaskPool has no tokenizer: set `taskpool.tokenizer` to a tokenizer "
                    "directory, or give the model pool a `tokenizer`."
                )
            tokenizer = AutoTokenizer.from_pretrained(name)
        self._tokenizer_obj = tokenizer
        return tokenizer

    def _bos_id(self, tokenizer: Any) -> int | None:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            return None
        if self.add_bos is None:
            probe = tokenizer("a").input_ids
            return bos if probe and probe[0] == bos else None
        return bos if self.add_bos else None

    def load_windows(self, tokenizer: Any) -> dict[str, list[list[int]]]:
        """Tokenise every source into evaluation windows (computed once, then cached).

        Each document is tokenised on its own (no special tokens), its tokens are read
        until the source's budget ``max_tokens_per_source`` is spent, and cut into
        consecutive windows of ``window_length`` tokens (one less when a BOS token is
        prepended); a last piece shorter than two tokens is dropped.

        Args:
            tokenizer: The tokenizer.

        Returns:
            ``{source name: [window token ids, ...]}``.
        """
        if self._windows is not None:
            return self._windows
        bos = self._bos_id(tokenizer)
        body = self.window_length - (1 if bos is not None else 0)
        if body < 2:
            raise ValueError("window_length leaves fewer than 2 text tokens per window.")
        windows: dict[str, list[list[int]]] = {}
        for name, spec in self.sources.items():
            budget = self.max_tokens_per_source
            chunks: list[list[int]] = []
            for document in load_source(spec):
                if budget is not None and budget <= 0:
                    break
                if not document.text.strip():
                    continue
                ids = tokenizer(document.text, add_special_tokens=False, verbose=False).input_ids
                if budget is not None:
                    ids = ids[:budget]
                    budget -= len(ids)
                for start in range(0, len(ids), body):
                    piece = ids[start : start + body]
                    if len(piece) >= 2:
                        chunks.append(([bos] if bos is not None else []) + piece)
            if not chunks:
                raise ValueError(f"Text source {name!r} gave no text to evaluate.")
            windows[str(name)] = chunks
        self._windows = windows
        return windows

    # --------------------------------------------------------------- evaluation
    # no_grad, not inference_mode: FSDP2's gathered parameters made under inference mode
    # could not be updated in place when training continues after an evaluation
    @torch.no_grad()
    def _score(
        self, model: nn.Module, moe: MoEInfo | None, windows: dict[str, list[list[int]]], label: str
    ) -> tuple[dict[str, Any], dict[str, RoutingAccumulator]]:
        device = next(model.parameters()).device
        tokenizer = self._tokenizer_obj
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None) or 0
        collect = moe is not None and self.routing_stats
        # sigmoid routers (GLM4-MoE): their actual selection, from hooks
        capture = RouterCapture(moe.routers) if collect and needs_capture(moe) else None
        sources: dict[str, Any] = {}
        routing: dict[str, RoutingAccumulator] = {}
        for name, chunks in windows.items():
            nll_sum, scored = 0.0, 0
            acc = _accumulator(moe) if collect else None
            started = time.perf_counter()
            batches = range(0, len(chunks), self.batch_size)
            for start in progress(
                batches, desc=f"{label} | {name}", enabled=self.show_progress, leave=False
            ):
                batch = chunks[start : start + self.batch_size]
                input_ids, attention_mask = _padded(batch, pad_id, device)
                kwargs = {"output_router_logits": True} if collect and capture is None else {}
                outputs = model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
                )
                for row in range(len(batch)):
                    n = int(attention_mask[row].sum())
                    logits = outputs.logits[row, : n - 1].float()
                    nll_sum += float(
                        F.cross_entropy(logits, input_ids[row, 1:n], reduction="sum").double()
                    )
                    scored += n - 1
                if acc is not None:
                    _add_routing(acc, outputs, capture, attention_mask)
                del outputs
            seconds = time.perf_counter() - started
            mean_nll = nll_sum / scored
            sources[name] = {
                "perplexity": math.exp(mean_nll),
                "mean_nll": mean_nll,
                "scored_tokens": scored,
                "windows": len(chunks),
                "seconds": seconds,
                "tokens_per_second": sum(len(c) for c in chunks) / seconds if seconds > 0 else None,
            }
            if acc is not None:
                routing[name] = acc
        if capture is not None:
            capture.close()
        return sources, routing

    def _routing_report(
        self, moe: MoEInfo, routing: dict[str, RoutingAccumulator], record: dict[str, Any] | None
    ) -> dict[str, Any]:
        anchors = list((record or {}).get("anchor_experts") or [])
        alphas = (record or {}).get("alphas")
        pooled = _accumulator(moe)
        for acc in routing.values():
            pooled.merge(acc)
        layers = pooled.layer_reports(anchors, self.dead_expert_threshold)
        for layer_index, report, router in zip(moe.moe_layers, layers, moe.routers, strict=True):
            cond, distinct = distinct_row_condition(router.weight)
            report["layer"] = layer_index
            report["condition_number"] = cond
            report["distinct_router_rows"] = distinct
            if alphas is not None and layer_index < len(alphas):
                report["alpha"] = float(alphas[layer_index])
        per_source, per_source_shares = {}, {}
        for name, acc in routing.items():
            source_layers = acc.layer_reports(anchors, self.dead_expert_threshold)
            per_source[name] = summarize_layers(source_layers)
            # which experts take this source's tokens (specialisation), averaged over layers
            per_source_shares[name] = [
                sum(layer["shares"][j] for layer in source_layers) / len(source_layers)
                for j in range(moe.num_experts)
            ]
        overall = summarize_layers(layers)
        overall["tokens"] = pooled.num_tokens
        overall["balanced_share"] = 1.0 / moe.num_experts
        if anchors:
            overall["anchor_experts"] = anchors
            overall["anchor_balanced_share"] = len(set(anchors)) / moe.num_experts
        return {
            "overall": overall,
            "per_source": per_source,
            "per_source_shares": per_source_shares,
            "layers": layers,
        }

    def _model_info(self, model: nn.Module, moe: MoEInfo | None) -> dict[str, Any]:
        config = getattr(model, "config", None)
        info: dict[str, Any] = {
            "class": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_layers": getattr(config, "num_hidden_layers", None),
            "is_moe": moe is not None,
        }
        if moe is not None:
            info.update(
                num_experts=moe.num_experts,
                experts_per_token=moe.top_k,
                moe_layers=len(moe.moe_layers),
                shared_expert=moe.shared_expert,
            )
        record = moe_ct_record(model)
        if record is not None:
            info["moe_ct"] = record
        return info

    def evaluate_model(self, model: nn.Module, label: str = "model") -> dict[str, Any]:
        """Evaluate one model (no references, no plots).

        Args:
            model: A transformers causal LM.
            label: Name shown in the progress bars.

        Returns:
            ``{"model": info, "perplexity": {source: ppl}, "overall_perplexity": ppl over all
            sources, "sources": {source: details}, "routing": {...}}`` (``routing`` only
            for MoE models).
        """
        tokenizer = self.load_tokenizer(model)
        windows = self.load_windows(tokenizer)
        moe = describe_moe(model)
        was_training = model.training
        model.eval()
        try:
            sources, routing = self._score(model, moe, windows, label)
        finally:
            model.train(was_training)
        total_nll = sum(s["mean_nll"] * s["scored_tokens"] for s in sources.values())
        total_tokens = sum(s["scored_tokens"] for s in sources.values())
        report: dict[str, Any] = {
            "model": self._model_info(model, moe),
            "perplexity": {name: s["perplexity"] for name, s in sources.items()},
            "overall_perplexity": math.exp(total_nll / total_tokens),
            "sources": sources,
        }
        if routing:
            report["routing"] = self._routing_report(moe, routing, moe_ct_record(model))
        return report

    def _evaluate_references(self) -> dict[str, dict[str, Any]]:
        names = list(self.reference_models or [])
        if not names:
            return {}
        pool = self._modelpool()
        if pool is None:
            log.info(
                "No FusionBench program/model pool attached: reference models %s are not evaluated.",
                names,
            )
            return {}
        for name in names:
            if name in self._reference_reports:
                continue
            if name not in getattr(pool, "all_model_names", []):
                log.warning("Reference model %r is not in the model pool; skipped.", name)
                continue
            log.info("Evaluating reference model %r from the model pool.", name)
            reference = pool.load_model(name)
            self._reference_reports[name] = self.evaluate_model(reference, label=name)
            del reference
        return {n: self._reference_reports[n] for n in names if n in self._reference_reports}

    def _plot_dir(self) -> Path | None:
        if self.output_dir is not None:
            return Path(self.output_dir)
        try:
            log_dir = getattr(self._program, "log_dir", None) if self._program is not None else None
        except Exception:  # the program's logger may not be set up
            log_dir = None
        return Path(log_dir) if log_dir else None

    def _write_plots(self, report: dict[str, Any]) -> dict[str, str]:
        folder = self._plot_dir()
        if not self.plots or folder is None:
            return {}
        suffix = "" if self._num_evaluations == 1 else f"_{self._num_evaluations}"
        written: dict[str, str] = {}
        record = report["model"].get("moe_ct") or {}
        routing = report.get("routing")
        if routing:
            layers = routing["layers"]
            written["expert_load"] = str(
                plot_expert_load(
                    [layer["shares"] for layer in layers],
                    folder / f"expert_load{suffix}.png",
                    layers=[layer["layer"] for layer in layers],
                    expert_names=record.get("experts"),
                    anchors=routing["overall"].get("anchor_experts", []),
                )
            )
        if record.get("alphas"):
            title = "MoE-CT alpha per layer"
            sources = record.get("expert_sources") or []
            if sources and all(s == "_pretrained_" for s in sources):
                title += "\n(pure upcycling: every expert is the base FFN, alpha has no effect)"
            written["alpha_schedule"] = str(
                plot_alpha_schedule(
                    record["alphas"], folder / f"alpha_schedule{suffix}.png", title=title
                )
            )
        return written

    @one_line_errors
    def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Evaluate ``model`` (and the reference models) on every source.

        Args:
            model: The (merged) transformers causal LM.

        Returns:
            A JSON-serialisable report: the ``evaluate_model`` fields, plus ``references``
            (``{name: report}``), ``perplexity_ratio`` (``{source: model / reference}``
            against the first reference), ``plots`` (``{kind: path}``), ``settings`` and
            ``seconds``.
        """
        started = time.perf_counter()
        self._num_evaluations += 1
        report = self.evaluate_model(model)
        references = self._evaluate_references()
        if references:
            report["references"] = references
            first = next(iter(references.values()))
            report["perplexity_ratio"] = {
                name: ppl / first["perplexity"][name]
                for name, ppl in report["perplexity"].items()
                if name in first["perplexity"]
            }
        report["plots"] = self._write_plots(report)
        report["settings"] = {
            "sources": self.sources,
            "max_tokens_per_source": self.max_tokens_per_source,
            "window_length": self.window_length,
            "batch_size": self.batch_size,
            "add_bos": self._bos_id(self._tokenizer_obj) is not None,
            "dead_expert_threshold": self.dead_expert_threshold,
        }
        report["seconds"] = time.perf_counter() - started
        report = without_empty_lists(to_jsonable(report))
        self._print_summary(report)
        return report

    def _print_summary(self, report: dict[str, Any]) -> None:
        references = report.get("references") or {}
        ref_name = next(iter(references), None)
        lines = ["", "MoETextTaskPool summary"]
        header = f"  {'source':<16} {'tokens':>7} {'model ppl':>10}"
        if ref_name:
            header += f" {ref_name + ' ppl':>16} {'ratio':>8}"
        lines.append(header)
        for name, details in report["sources"].items():
            line = f"  {name:<16} {details['scored_tokens']:>7} {details['perplexity']:>10.4f}"
            if ref_name and name in references[ref_name]["perplexity"]:
                line += f" {references[ref_name]['perplexity'][name]:>16.4f}"
                line += f" {report['perplexity_ratio'][name]:>8.5f}"
            lines.append(line)
        routing = report.get("routing")
        if routing:
            o = routing["overall"]

            def fmt(v: Any) -> str:
                return "n/a" if v is None else f"{v:.4g}"

            lines.append(
                f"  routing over {o['num_layers']} MoE layers, {o['tokens']} tokens: "
                f"CV {fmt(o['mean_cv'])}, MaxVio mean {fmt(o['mean_max_violation'])} / max "
                f"{fmt(o['max_max_violation'])}, load entropy {fmt(o['mean_load_entropy'])}, "
                f"router entropy {fmt(o['mean_router_entropy'])}, dead experts {o['dead_experts']}"
                + (
                    f", anchor share {fmt(o['mean_anchor_share'])}"
                    if o.get("mean_anchor_share") is not None
                    else ""
                )
                + f", router cond. max {fmt(o.get('max_condition_number'))}"
            )
        for kind, path in (report.get("plots") or {}).items():
            lines.append(f"  plot {kind}: {path}")
        print("\n".join(lines), flush=True)


def _accumulator(moe: MoEInfo) -> RoutingAccumulator:
    return RoutingAccumulator(
        len(moe.moe_layers), moe.num_experts, moe.top_k, router_scoring(moe.model_type)
    )


def _padded(batch: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, ...]:
    """Windows right-padded to one length, and their attention mask."""
    length = max(len(c) for c in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, chunk in enumerate(batch):
        input_ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        attention_mask[row, : len(chunk)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _add_routing(acc: RoutingAccumulator, outputs: Any, capture: Any, mask: torch.Tensor) -> None:
    if capture is None:
        acc.update(outputs.router_logits, mask)
    else:
        logits, indices = capture.take()
        acc.update(logits, mask, selected=indices)
