"""Routing-balance metrics of Mixture-of-Experts models (pure functions, no I/O).

Notation, for one MoE layer with E routed experts and top-k routing over N (non-padding)
tokens: c_e is the number of tokens whose top-k set contains expert e (so
sum_e c_e = k N), and the **load share** of expert e is s_e = c_e / sum_j c_j
(sum_e s_e = 1; a perfectly balanced router gives s_e = 1/E).

- coefficient of variation: CV = std(c) / mean(c), population std (ddof = 0);
- MaxVio = max_e c_e / mean(c) - 1 (DeepSeek's maximal violation; 0 when balanced,
  E - 1 when one expert takes everything);
- normalised load entropy: H(s) / ln E, in [0, 1] (1 = balanced);
- normalised router entropy: mean over tokens of H(p) / ln E with p = softmax(logits)
  (sigmoid routers, GLM4-MoE: sigmoid(logits) normalised to sum 1), how undecided the
  router is per token; 1 = uniform probabilities;
- Gini coefficient of c (0 = balanced, (E - 1) / E = one expert takes everything);
- dead experts: experts with s_e < threshold / E (``threshold`` is a fraction of the
  balanced share);
- anchor share: sum of s_e over the anchor experts;
- router condition number: sigma_max / sigma_min of the router weight matrix (E x H),
  computed on its distinct rows (fine-grained experts share rows by design) with
  ``fusion_bench_moect.ops.routers.condition_number``.

Selection mirrors the transformers MoE blocks: softmax in float32, then top-k. Routers whose
selection is not a top-k of their logits (GLM4-MoE: sigmoid scores plus a selection bias,
group-limited) pass the experts they actually selected (``eval.capture.RouterCapture``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fusion_bench_moect.ops.balancing import expert_counts, router_probabilities
from fusion_bench_moect.ops.routers import condition_number as router_condition_number

__all__ = [
    "HEADLINE_METRICS",
    "STEP_METRICS",
    "RoutingAccumulator",
    "anchor_share",
    "coefficient_of_variation",
    "distinct_row_condition",
    "dead_experts",
    "gini",
    "layer_balance",
    "load_entropy",
    "load_shares",
    "max_violation",
    "router_entropy_sum",
    "selected_counts",
    "selection_counts",
    "summarize_layers",
]


def _as_float_tensor(counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(counts, dtype=torch.float64).flatten()


def _flatten_logits(router_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    if mask is not None:
        mask = mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
        if mask.numel() != logits.shape[0]:
            raise ValueError(
                f"The mask has {mask.numel()} entries but the router logits hold "
                f"{logits.shape[0]} tokens."
            )
        logits = logits[mask]
    return logits


def selection_counts(
    router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Count how many tokens route to each expert.

    Args:
        router_logits: Router logits, shape ``(tokens, E)`` (or ``(..., E)``).
        top_k: Experts per token k.
        mask: Optional boolean (or 0/1) mask over the tokens; ``False`` entries (padding)
            are ignored. Flattened in the same order as the logits.

    Returns:
        An int64 tensor of E counts c_e (sum = k * kept tokens).
    """
    logits = _flatten_logits(router_logits, mask)
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}.")
    if logits.shape[0] == 0:
        return torch.zeros(num_experts, dtype=torch.int64)
    probs = torch.softmax(logits.float(), dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices
    return torch.bincount(selected.reshape(-1).cpu(), minlength=num_experts).to(torch.int64)


def router_entropy_sum(
    router_logits: torch.Tensor, mask: torch.Tensor | None = None, scoring: str = "softmax"
) -> float:
    """Sum over tokens of the natural-log entropy of the router's probabilities.

    Args:
        router_logits: Router logits, shape ``(tokens, E)``.
        mask: Optional token mask (see ``selection_counts``).
        scoring: ``softmax``, or ``sigmoid`` (scores normalised to sum 1 per token).

    Returns:
        sum_t H(p_t) in nats (divide by the token count and ln E to normalise).
    """
    logits = _flatten_logits(router_logits, mask).float()
    if logits.shape[0] == 0:
        return 0.0
    if scoring == "softmax":
        log_probs = torch.log_softmax(logits, dim=-1)
    else:
        log_probs = router_probabilities(logits, scoring).clamp_min(1e-30).log()
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return float(entropy.double().sum())


def selected_counts(
    indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-expert counts of the experts a router actually selected (``indices`` ``(tokens,
    k)``), ignoring masked-out tokens; int64 ``(E,)``."""
    indices = _flatten_logits(indices, mask)
    return expert_counts(indices.cpu(), num_experts).to(torch.int64)


def load_shares(counts: Sequence[float] | torch.Tensor) -> list[float]:
    """Each expert's share s_e = c_e / sum(c) of the routed token slots (zeros if no tokens)."""
    c = _as_float_tensor(counts)
    total = float(c.sum())
    if total <= 0:
        return [0.0] * c.numel()
    return (c / total).tolist()


def coefficient_of_variation(counts: Sequence[float] | torch.Tensor) -> float | None:
    """std(c) / mean(c) with the population standard deviation; ``None`` without tokens."""
    c = _as_float_tensor(counts)
    mean = float(c.mean())
    if mean <= 0:
        return None
    return float(c.std(unbiased=False)) / mean


def max_violation(counts: Sequence[float] | torch.Tensor) -> float | None:
    """MaxVio = max(c) / mean(c) - 1; ``None`` without tokens."""
    c = _as_float_tensor(counts)
    mean = float(c.mean())
    if mean <= 0:
        return None
    return float(c.max()) / mean - 1.0


def load_entropy(counts: Sequence[float] | torch.Tensor) -> float | None:
    """Normalised entropy H(s) / ln E of the load shares (1 = balanced); ``None`` without tokens.

    A single expert (E = 1) is balanced by definition and gives 1.
    """
    c = _as_float_tensor(counts)
    total = float(c.sum())
    if total <= 0:
        return None
    if c.numel() == 1:
        return 1.0
    s = c[c > 0] / total
    return float(-(s * s.log()).sum()) / math.log(c.numel())


def gini(counts: Sequence[float] | torch.Tensor) -> float | None:
    """Gini coefficient of the loads: sum_i sum_j |c_i - c_j| / (2 E^2 mean(c)); ``None`` without tokens."""
    c = _as_float_tensor(counts)
    mean = float(c.mean())
    if mean <= 0:
        return None
    n = c.numel()
    return float((c[:, None] - c[None, :]).abs().sum()) / (2 * n * n * mean)


def dead_experts(counts: Sequence[float] | torch.Tensor, threshold: float = 0.1) -> list[int]:
    """Experts whose share is below ``threshold`` times the balanced share 1/E.

    Args:
        counts: Per-expert counts c_e.
        threshold: Fraction of the balanced share; 0 reports only experts that got no token.

    Returns:
        Sorted indices of the dead experts (empty when there were no tokens).
    """
    c = _as_float_tensor(counts)
    total = float(c.sum())
    if total <= 0:
        return []
    if threshold <= 0:
        return [i for i, v in enumerate(c.tolist()) if v == 0]
    limit = threshold / c.numel()
    return [i for i, s in enumerate((c / total).tolist()) if s < limit]


def anchor_share(counts: Sequence[float] | torch.Tensor, anchors: Iterable[int]) -> float | None:
    """Total load share of the anchor experts; ``None`` without anchors or tokens."""
    anchors = sorted(set(int(a) for a in anchors))
    if not anchors:
        return None
    c = _as_float_tensor(counts)
    total = float(c.sum())
    if total <= 0:
        return None
    if anchors[0] < 0 or anchors[-1] >= c.numel():
        raise ValueError(f"Anchor experts {anchors} out of range for {c.numel()} experts.")
    return float(c[anchors].sum()) / total


def distinct_row_condition(weight: torch.Tensor) -> tuple[float | None, int]:
    """Condition number of a router weight matrix over its distinct rows.

    Fine-grained experts share router rows by design, which would make the full matrix
    singular; only distinct rows count.

    Args:
        weight: Router weight, shape ``(E, H)``.

    Returns:
        ``(sigma_max / sigma_min, number of distinct rows)``; the condition number is
        ``None`` when sigma_min is zero (linearly dependent rows).
    """
    if hasattr(weight, "full_tensor"):  # an FSDP2 shard: gather it (every rank evaluates)
        weight = weight.full_tensor()
    rows = torch.unique(weight.detach().to(device="cpu", dtype=torch.float32), dim=0)
    value = router_condition_number(rows)
    return (value if math.isfinite(value) else None), rows.shape[0]


def layer_balance(
    counts: Sequence[float] | torch.Tensor,
    *,
    entropy_sum: float | None = None,
    num_tokens: int | None = None,
    anchors: Iterable[int] = (),
    dead_threshold: float = 0.1,
) -> dict[str, Any]:
    """All balance metrics of one layer (or of a pooled set of layers).

    Args:
        counts: Per-expert counts c_e.
        entropy_sum: Sum of per-token router entropies in nats (``router_entropy_sum``);
            with ``num_tokens`` gives the normalised router entropy.
        num_tokens: Number of tokens behind ``entropy_sum``.
        anchors: Anchor expert indices (for ``anchor_share``).
        dead_threshold: See ``dead_experts``.

    Returns:
        A JSON-serialisable dict: ``tokens``, ``shares``, ``cv``, ``max_violation``,
        ``load_entropy``, ``router_entropy``, ``gini``, ``dead_experts``,
        ``num_dead_experts``, ``anchor_share``.
    """
    c = _as_float_tensor(counts)
    num_experts = c.numel()
    router_entropy = None
    if entropy_sum is not None and num_tokens:
        router_entropy = (
            entropy_sum / num_tokens / math.log(num_experts) if num_experts > 1 else 1.0
        )
    dead = dead_experts(c, dead_threshold)
    return {
        "tokens": int(num_tokens) if num_tokens is not None else None,
        "shares": load_shares(c),
        "cv": coefficient_of_variation(c),
        "max_violation": max_violation(c),
        "load_entropy": load_entropy(c),
        "router_entropy": router_entropy,
        "gini": gini(c),
        "dead_experts": dead,
        "num_dead_experts": len(dead),
        "anchor_share": anchor_share(c, anchors),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


#: The headline metrics of a routing summary (``report["routing"]["overall"]``), in table
#: order: the one list that leaderboards and the study read.
HEADLINE_METRICS = (
    "mean_cv",
    "mean_max_violation",
    "max_max_violation",
    "mean_load_entropy",
    "mean_router_entropy",
    "dead_experts",
    "mean_anchor_share",
    "max_condition_number",
)
#: The balance metrics recorded at every training step (cheap: no condition numbers).
STEP_METRICS = (
    "mean_cv",
    "mean_max_violation",
    "mean_router_entropy",
    "dead_experts",
    "mean_anchor_share",
)


def _max(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return max(kept) if kept else None


def summarize_layers(layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Model-level summary of per-layer metrics.

    Args:
        layers: Per-layer dicts as returned by ``layer_balance`` (optionally with a
            ``condition_number`` and an ``alpha`` entry).

    Returns:
        Means over layers (``mean_cv``, ``mean_max_violation``, ``mean_load_entropy``,
        ``mean_router_entropy``, ``mean_gini``, ``mean_anchor_share``,
        ``mean_condition_number``), worst cases (``max_max_violation``,
        ``max_condition_number``), ``dead_experts`` (total (layer, expert) pairs) and
        ``layers_with_dead_experts``.
    """
    summary = {
        "num_layers": len(layers),
        "mean_cv": _mean(layer.get("cv") for layer in layers),
        "mean_max_violation": _mean(layer.get("max_violation") for layer in layers),
        "max_max_violation": _max(layer.get("max_violation") for layer in layers),
        "mean_load_entropy": _mean(layer.get("load_entropy") for layer in layers),
        "mean_router_entropy": _mean(layer.get("router_entropy") for layer in layers),
        "mean_gini": _mean(layer.get("gini") for layer in layers),
        "dead_experts": sum(layer.get("num_dead_experts", 0) for layer in layers),
        "layers_with_dead_experts": [
            layer.get("layer", i) for i, layer in enumerate(layers) if layer.get("num_dead_experts")
        ],
        "mean_anchor_share": _mean(layer.get("anchor_share") for layer in layers),
    }
    if any("condition_number" in layer for layer in layers):
        summary["mean_condition_number"] = _mean(layer.get("condition_number") for layer in layers)
        summary["max_condition_number"] = _max(layer.get("condition_number") for layer in layers)
    return summary


class RoutingAccumulator:
    """Accumulates selection counts and router entropies over batches, per MoE layer.

    Args:
        num_layers: Number of MoE layers (entries of ``router_logits``).
        num_experts: Routed experts per layer E.
        top_k: Experts per token k.
        scoring: The routers' probabilities, ``softmax`` or ``sigmoid`` (router entropy).
    """

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, scoring: str = "softmax"
    ) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring = scoring
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.entropy_sums = [0.0] * num_layers
        self.num_tokens = 0

    def update(
        self,
        router_logits: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        selected: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Add one forward pass.

        Args:
            router_logits: One ``(tokens, E)`` tensor per MoE layer.
            mask: Token mask (``attention_mask``), flattened like the logits.
            selected: The experts each layer's router selected, ``(tokens, k)`` (None: the
                softmax top-k of the logits).
        """
        if len(router_logits) != self.counts.shape[0]:
            raise ValueError(
                f"Expected router logits for {self.counts.shape[0]} MoE layers, got {len(router_logits)}."
            )
        for i, logits in enumerate(router_logits):
            if selected is None:
                self.counts[i] += selection_counts(logits, self.top_k, mask)
            else:
                self.counts[i] += selected_counts(selected[i], self.num_experts, mask)
            self.entropy_sums[i] += router_entropy_sum(logits, mask, self.scoring)
        self.num_tokens += int(mask.sum()) if mask is not None else router_logits[0].shape[0]

    def merge(self, other: RoutingAccumulator) -> None:
        """Add another accumulator's statistics (same shape) to this one."""
        self.counts += other.counts
        self.entropy_sums = [
            a + b for a, b in zip(self.entropy_sums, other.entropy_sums, strict=True)
        ]
        self.num_tokens += other.num_tokens

    def layer_reports(
        self, anchors: Iterable[int] = (), dead_threshold: float = 0.1
    ) -> list[dict[str, Any]]:
        """``layer_balance`` of every MoE layer (without a ``layer`` index)."""
        anchors = list(anchors)
        return [
            layer_balance(
                self.counts[i],
                entropy_sum=self.entropy_sums[i],
                num_tokens=self.num_tokens,
                anchors=anchors,
                dead_threshold=dead_threshold,
            )
            for i in range(self.counts.shape[0])
        ]
