"""The build parameters of MoE-CT upcycling: one schema, every other listing derived from it.

``MoECTConfig`` holds each parameter with its default, a one-line description and its
field-level checks. ``OrthogonalMoECTMergingAlgorithm.__init__``, the lean CLI's options
(``fusion_bench_moect.cli.upcycle``), ``config/method/moe_ct_upcycling.yaml`` (``method_yaml``),
the parameter table of docs/algorithm.md (``parameter_table``), the ``moe_ct`` record saved in
``config.json`` (``MoECTConfig.record``) and the study's merge settings (``study/common.py``)
are all generated from it: adding a parameter means adding one field here plus its use.

Checks that need the base model (divisibility by the intermediate size, expert names, top-k
against the expert count) live in ``plan.make_plan``. No torch import: the lean CLI parses its
options before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .ops.schedules import ALPHA_STRATEGIES
from .schema import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_path,
    markdown_table,
    param,
    plain,
    run_checks,
    signature,
    yaml_value,
)
from .schema import (
    method_yaml as schema_yaml,
)

GATE_MODES = ("orthogonal", "random", "uniform_random", "hidden", "cheap_embed")
#: Gate modes that need prompts, a tokenizer and a forward pass of the dense model.
PROMPT_GATE_MODES = ("hidden", "cheap_embed")
#: Router default factor on the anchor experts' rows when ``router_aux_scale`` is null.
DEFAULT_ANCHOR_ROUTER_SCALE = 1.1
#: ``non_expert_merge`` value that keeps the base's non-FFN tensors.
KEEP_BASE = "base"


def number_or_mapping(text: str) -> float | dict[str, float]:
    """``0.1`` or ``name=0.1,other=0.2`` (command-line form of a per-expert number)."""
    if "=" not in text:
        return float(text)
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name.strip(): float(value) for name, value in pairs}


def strategy_or_list(text: str) -> str | list[float]:
    """A schedule name or a comma-separated list of per-layer alphas (command-line form)."""
    if "," in text or text.replace(".", "", 1).isdigit():
        return [float(v) for v in text.split(",") if v]
    return text


def layers_or_auto(text: str) -> str | list[int]:
    """``auto_from_alpha`` or comma-separated layer indices (command-line form)."""
    if text == "auto_from_alpha":
        return text
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected auto_from_alpha or layer indices like 0,2,4, got {text!r}"
        ) from err


def shared_entry(text: str) -> str | dict[str, Any]:
    """``name`` or ``name=residual_scale`` (command-line form of a shared-expert entry)."""
    name, sep, scale = text.partition("=")
    return {"source": name, "residual_scale": float(scale)} if sep else text


def algorithm_config(text: str) -> str | dict[str, Any]:
    """``base``, an algorithm class, or a YAML mapping ``{_target_: CLASS, option: value}``
    (command-line form of ``non_expert_merge``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not YAML: {text!r} ({err})") from err
    if not isinstance(value, (str, dict)):
        raise argparse.ArgumentTypeError(
            f"expected base or {{_target_: fusion_bench.method.SimpleAverageAlgorithm}}, "
            f"got {text!r}"
        )
    return value


_param = param
_int = check_int
_bool = check_bool
_choice = check_choice


def _float(low: float, high: float, high_open: bool = False) -> Callable[[str, Any], Any]:
    return check_float(low, high, high_open=high_open)


def _positive_or_null(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number or null, got {value!r}.")
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value}.")
    return float(value)


def _strategy(name: str, value: Any) -> str | list[float]:
    if isinstance(value, str):
        return _choice(ALPHA_STRATEGIES)(name, value)
    return [float(v) for v in value]  # length and range are checked against the model


def _moe_layers(name: str, value: Any) -> str | list[int] | None:
    if value is None or isinstance(value, str):
        return value  # the string is checked with the schedule (plan.make_plan)
    if isinstance(value, (int, float)):
        value = [value]
    return [_int(0)(name, v) for v in value]  # the range is checked against the model


def _shared_experts(name: str, value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (str, Mapping)):
        value = [value]
    return [dict(v) if isinstance(v, Mapping) else str(v) for v in value]


def _merge_method(name: str, value: Any) -> str | dict[str, Any]:
    if value == KEEP_BASE:
        return value
    if isinstance(value, str) and "." in value:  # a class path alone: no parameters
        value = {"_target_": value}
    if isinstance(value, Mapping) and isinstance(value.get("_target_"), str) and value["_target_"]:
        return plain(value)
    raise ValueError(
        f"{name} must be base or a FusionBench algorithm config such as "
        f"{{_target_: fusion_bench.method.SimpleAverageAlgorithm}}, got {value!r}."
    )


def _pattern(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a regular expression or null, got {value!r}.")
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name} {value!r} is not a regular expression ({err}).") from err
    return value


def _names(name: str, value: Any) -> list[str] | None:
    return None if value is None else [str(v) for v in value]


@dataclass(frozen=True)
class MoECTConfig:
    """Every build parameter of MoE-CT upcycling, checked (see docs/algorithm.md)."""

    num_experts: int | None = _param(
        None,
        "experts per layer for pure upcycling (null = 8); derived when merging (sources "
        "(+ base) x G), where a different value is an error",
        check=_int(1, optional=True),
        parse=int,
    )
    experts_per_token: int = _param(
        2,
        "top-k experts per token, 1 <= k <= E (a multiple of granularity keeps the base function)",
        check=_int(),  # its range depends on the expert count: make_plan checks it
        parse=int,
    )
    gate_mode: str = _param(
        "orthogonal",
        "router initialisation: orthogonal | random | uniform_random | hidden | cheap_embed",
        check=_choice(GATE_MODES),
        choices=tuple(m for m in GATE_MODES if m not in PROMPT_GATE_MODES),
    )
    gate_scale: float = _param(1.0, "factor on every router row", check=None, parse=float)
    moe_ct_mode: bool = _param(
        True,
        "fuse each source with the base FFN: lerp(W_base, W_source, alpha_l); false = alpha 1",
        check=_bool,
        flag="--no-moe-ct",
    )
    base_alpha: float = _param(
        0.8, "peak alpha of the schedule, in [0, 1]", check=_float(0.0, 1.0), parse=float
    )
    alpha_strategy: str | list[float] = _param(
        "u_shaped",
        "constant | linear_increase | linear_decrease | u_shaped | [one alpha per layer]",
        check=_strategy,
        parse=strategy_or_list,
    )
    include_base_expert: bool = _param(
        True,
        "when merging, add the base FFN as a routed anchor expert",
        check=_bool,
        flag="--no-base-expert",
    )
    router_aux_scale: float | None = _param(
        None,
        f"factor on the anchor experts' router rows (null = {DEFAULT_ANCHOR_ROUTER_SCALE} "
        "with an anchor expert, else 1)",
        check=_positive_or_null,
        parse=float,
    )
    anchor_experts: list[str] | None = _param(
        None, "expert names to anchor instead of the base expert", check=_names, nargs="+"
    )
    noise_scale: float | dict[str, float] = _param(
        0.0,
        "std of Gaussian noise on expert weights (number or {expert: number})",
        parse=number_or_mapping,
        help="std of Gaussian noise on expert weights: X, or NAME=X,... per expert",
    )
    residual_scale: float | dict[str, float] = _param(
        1.0,
        "factor on expert down projections (number or {expert: number})",
        parse=number_or_mapping,
        help="factor on expert down projections: X, or NAME=X,... per expert",
    )
    drop_ratio: float = _param(
        0.0,
        "Drop-Upcycling: fraction of neurons re-initialised per non-anchor expert, in [0, 1)",
        check=_float(0.0, 1.0, high_open=True),
        parse=float,
    )
    granularity: int = _param(
        1,
        "G fine-grained experts per FFN (each a 1/G neuron slice; G divides the FFN size)",
        check=_int(1),
        parse=int,
    )
    permute_neurons: bool = _param(
        False, "slice a seeded neuron permutation instead of contiguous ranges", check=_bool
    )
    shared_expert_share: float = _param(
        0.5,
        "outputs with a shared expert: share of the output given to it (default: the base FFN), "
        "in [0, 1]",
        check=_float(0.0, 1.0),
        parse=float,
    )
    shared_experts: list[Any] | None = _param(
        None,
        "outputs with a shared expert: pool names whose FFNs together form it, each entry a "
        "name or {source: name, residual_scale: r} (null = the base alone)",
        check=_shared_experts,
        parse=shared_entry,
        nargs="+",
        help="outputs with a shared expert: the experts (--source names) whose FFNs together "
        "form it, each NAME or NAME=R (R: its residual scale); null = the base alone",
    )
    moe_layers: str | list[int] | None = _param(
        None,
        "outputs that can keep dense layers: layer indices that become MoE, or auto_from_alpha "
        "(layers with alpha 0 stay dense); null = every layer",
        check=_moe_layers,
        parse=layers_or_auto,
    )
    n_group: int = _param(
        1,
        "outputs with group-limited routing: equal expert groups per layer (divides the expert "
        "count); 1 = no groups",
        check=_int(1),
        parse=int,
    )
    topk_group: int = _param(
        1,
        "outputs with group-limited routing: the groups (best first) a token's experts come "
        "from, <= n_group",
        check=_int(1),
        parse=int,
    )
    non_expert_merge: str | dict[str, Any] = _param(
        KEEP_BASE,
        "the non-FFN weights (attention, norms, embeddings, lm_head): base (the base's), or a "
        "FusionBench algorithm run on the base and source models for them, e.g. {_target_: "
        "fusion_bench.method.TaskArithmeticAlgorithm, scaling_factor: 0.3}",
        check=_merge_method,
        parse=algorithm_config,
    )
    non_expert_tensors: str | None = _param(
        None,
        "with non_expert_merge: a regular expression (re.search) selecting the non-FFN tensors "
        "it merges, e.g. self_attn; the others stay the base's (null = all)",
        check=_pattern,
    )
    prompts: dict[str, Any] | None = _param(
        None,
        "hidden / cheap_embed: {expert name: [prompts] or {positive: [], negative: []}}",
        flag=None,
    )
    architecture: str = _param(
        "auto", "output family (docs/algorithm.md, What is built); auto: the base's default"
    )
    dtype: str | None = _param(
        None,
        "output dtype (null = the pool's model_kwargs dtype, else the base's)",
        help="output dtype: float32 | bfloat16 | float16 (null = the base's)",
    )
    seed: int = _param(
        42,
        "seed of routers, noise, drop and permutation (independent streams)",
        check=_int(),
        parse=int,
    )
    save_checkpoint: str | None = _param(
        None,
        "directory for the Hugging Face checkpoint (written atomically; run() then returns "
        "the written files, mapped)",
        check=check_optional_path,
        flag=None,
    )
    overwrite: bool = _param(
        False,
        "replace a non-empty save_checkpoint directory",
        check=_bool,
        help="replace a non-empty OUTPUT directory",
    )
    streaming: bool = _param(
        False,
        "write save_checkpoint shard by shard, never holding the model (run() returns null)",
        check=_bool,
        flag=None,
    )

    def __post_init__(self) -> None:
        run_checks(self)
        if self.non_expert_tensors is not None and self.non_expert_merge == KEEP_BASE:
            raise ValueError(
                "non_expert_tensors selects what non_expert_merge merges, but non_expert_merge "
                "is base; set non_expert_merge to a FusionBench algorithm config, or drop "
                "non_expert_tensors."
            )

    @classmethod
    def names(cls) -> list[str]:
        """The parameter names, in schema order."""
        return [f.name for f in dataclasses.fields(cls)]

    def record(self) -> dict[str, Any]:
        """Every parameter as a plain JSON-able value (the ``params`` of ``moe_ct``)."""
        return {name: plain(getattr(self, name)) for name in self.names()}

    def pick(self, *names: str) -> dict[str, Any]:
        """Some parameters as a plain dict (e.g. the fixed settings of a study)."""
        record = self.record()
        return {name: record[name] for name in names}

    def anchor_router_scale(self, has_anchor: bool) -> float:
        """The factor on anchor router rows: the set value, or the default for null."""
        if self.router_aux_scale is not None:
            return self.router_aux_scale
        return DEFAULT_ANCHOR_ROUTER_SCALE if has_anchor else 1.0


def init_signature() -> inspect.Signature:
    """``(self, <every parameter with its default>, **kwargs)``: the algorithm's signature."""
    return signature(MoECTConfig)


def method_yaml() -> str:
    """``config/method/moe_ct_upcycling.yaml``, FusionBench's banner included."""
    notes = [
        "Dense model (+ fine-tunes) -> Mixture-of-Experts. Generated from",
        "fusion_bench_moect/params.py (MoECTConfig); every parameter is documented in",
        "docs/algorithm.md.",
    ]
    return schema_yaml(
        MoECTConfig,
        "fusion_bench_moect.OrthogonalMoECTMergingAlgorithm",
        "MoE-CT upcycling (fusion-bench-moect)",
        notes,
        width=27,
    )


def parameter_table() -> str:
    """The Markdown parameter table of docs/algorithm.md."""
    return markdown_table(MoECTConfig)


#: How each command-line form is written (the option's metavar), by its parse function.
_METAVARS: dict[Any, str] = {
    int: "N",
    float: "X",
    number_or_mapping: "X|NAME=X,...",
    strategy_or_list: "NAME|A0,A1,...",
    layers_or_auto: "auto_from_alpha|I,J,...",
    shared_entry: "NAME[=R]",
    algorithm_config: "base|{_target_: CLASS, ...}",
}


def cli_help(f: dataclasses.Field) -> str:
    """An option's help, generated from the schema field so that it cannot contradict it: a
    flag says which value it sets; an option with choices lists exactly the ones it accepts
    (a doc listing values reads ``"what: a | b | c"``). A field's ``help`` replaces its doc
    where the doc speaks of YAML forms or of the model pool."""
    cli = f.metadata["cli"]
    doc, default = cli.get("help", f.metadata["doc"]), yaml_value(f.default)
    if isinstance(f.default, bool):
        if f.default:
            return f"set {f.name} to false (default true: {doc})"
        return f"set {f.name} to true: {doc} (default false)"
    choices = cli.get("choices")
    if choices:
        doc = f"{doc.partition(':')[0]}: {' | '.join(choices)}"
    return f"{doc} (default {default})"


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per parameter with a command-line form (defaults: the schema's)."""
    for f in dataclasses.fields(MoECTConfig):
        cli = f.metadata["cli"]
        flag = cli.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": cli_help(f)}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            parse = cli.get("parse")
            kwargs.update(type=parse, choices=cli.get("choices"), nargs=cli.get("nargs"))
            kwargs["metavar"] = None if cli.get("choices") else _METAVARS.get(parse, "NAME")
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "default"}
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> MoECTConfig:
    """The schema from parsed ``add_cli_options`` arguments plus ``fixed`` values."""
    values = {n: getattr(args, n) for n in MoECTConfig.names() if hasattr(args, n)}
    return MoECTConfig(**{**values, **fixed})
