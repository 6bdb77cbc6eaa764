"""Issue 28's evidence: the MoE's attention from the base vs averaged over the experts vs task
arithmetic over them (``non_expert_merge`` on ``self_attn``), per-language held-out
perplexity at merge, after the router stage and after the experts stage.

    flock /tmp/moect-heavy.lock python -m study.non_expert            # ~45 CPU minutes
    python -m study.non_expert --seeds 42,1 --resume    # a second seed: ~10 more minutes
    python -m study.non_expert --quick --out outputs/study-non-expert-quick   # smoke, ~10 min

The study's experts train only their FFNs (their attention is the base's, so every attention
merge would give the base's): this row trains its own experts on every weight
(``train_target: all``, the study's other expert settings), cached under
``<cache>/experts-all``. Every row is ``u_shaped@0.8`` of the grid (Mixtral, base anchor, aux
1.1, orthogonal routers, seed 42); the trained runs are ``study/trained.py``'s (30 router
steps, 30 experts steps). Writes ``non_expert.json`` and ``non_expert.md`` (the section for
docs/study.md) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_moect.paths import cache_root

from . import experts as experts_mod
from .common import fmt, pm, table
from .grid import grid_rows
from .trained import POINTS, run_trained

log = logging.getLogger(__name__)

#: The compared rows: name -> the non-expert parameters added to ``u_shaped@0.8``.
VARIANTS: dict[str, dict[str, Any]] = {
    "base attention": {},
    "averaged attention": {
        "non_expert_merge": {"_target_": "fusion_bench.method.SimpleAverageAlgorithm"},
        "non_expert_tensors": "self_attn",
    },
    "task arithmetic attention (0.3)": {
        "non_expert_merge": {
            "_target_": "fusion_bench.method.TaskArithmeticAlgorithm",
            "scaling_factor": 0.3,
        },
        "non_expert_tensors": "self_attn",
    },
}
CENTRE = "u_shaped@0.8"


def rows(seeds: Sequence[int] = (42,)) -> list[dict[str, Any]]:
    """One trained-run row per seed and variant, ``u_shaped@0.8`` of the grid plus its
    parameters (the seed sets the router init and the training data's order)."""
    centre = next(r for r in grid_rows() if r["name"] == CENTRE)
    pairs = [(seed, name) for seed in seeds for name in VARIANTS]
    return [
        {
            "name": name,
            "group": "non-expert",
            "params": {**centre["params"], "seed": seed, **VARIANTS[name]},
            "index": i,
        }
        for i, (seed, name) in enumerate(pairs)
    ]


def section(result: Mapping[str, Any], command: str) -> str:
    """The markdown section: references, then each variant's perplexities at each point."""
    refs = result["references"]
    seeds = list(dict.fromkeys(run["params"]["seed"] for run in result["runs"]))
    langs = list(next(iter(refs.values()))["perplexity"])
    lines = [
        "## Attention merged over the experts (issue 28)",
        "",
        f"`{command}`. Experts trained on every weight (`train_target: all`); each MoE is "
        f"`{CENTRE}` with its attention from the base, averaged over the experts "
        "(`SimpleAverageAlgorithm`) or by task arithmetic (scaling 0.3), then trained "
        "(router stage, experts stage). Held-out perplexity (lower is better; mean ± std "
        f"over seeds {', '.join(map(str, seeds))}):",
        "",
    ]
    body = [
        [name, "dense", *(fmt(r["perplexity"][lang]) for lang in langs)] for name, r in refs.items()
    ]
    for name in VARIANTS:
        runs = [run for run in result["runs"] if run["name"] == name]
        for point in POINTS:
            cells = [pm([r["points"][point].get(f"ppl_{lang}") for r in runs]) for lang in langs]
            body.append([name, point, *cells])
    lines += table(["model", "point", *langs], body)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.non_expert", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 expert steps, 3+3")
    parser.add_argument("--out", default="outputs/study-non-expert")
    parser.add_argument("--langs", default=",".join(experts_mod.DEFAULT_LANGS))
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--seeds", default="42", help="router and data seeds, e.g. 42,1")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--experts-dir", default=str(cache_root() / "experts-all"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quick = args.quick
    settings = experts_mod.ExpertSettings(train_target="all", **({"steps": 10} if quick else {}))
    root = Path(args.experts_dir + ("-quick" if quick else ""))
    langs = [lang for lang in args.langs.split(",") if lang]
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    experts_mod.build_experts(langs, settings, root=root)
    experts = {lang: str(experts_mod.expert_dir(lang, root)) for lang in langs}
    out = Path(args.out)
    result = run_trained(
        str(experts_mod.base_model_dir()),
        experts,
        out / "trained",
        rows(seeds),
        router_steps=3 if quick else 30,
        experts_steps=3 if quick else 30,
        eval_tokens=args.eval_tokens or (512 if quick else 1024),
        resume=args.resume,
        summary="non_expert.json",
    )
    result = {**result, "expert_settings": dataclasses.asdict(settings)}
    (out / "non_expert.json").write_text(json.dumps(result, indent=1))
    command = "python -m study.non_expert" + (" --quick" if quick else "")
    command += "" if seeds == [42] else f" --seeds {','.join(map(str, seeds))}"
    (out / "non_expert.md").write_text(section(result, command))
    log.info("Wrote %s", out / "non_expert.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
