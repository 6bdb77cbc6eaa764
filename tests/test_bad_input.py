"""docs/algorithm.md, "Bad input": every bad input gets a clear error naming the culprit, and
nothing is written; through the Python API (the original exception type) and through the real
``fusion_bench`` CLI (the message on the last lines of the output)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_tiny_model, perturbed, pool, save, train_tokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

TESTS = Path(__file__).resolve().parent


@dataclass
class Setup:
    """One bad run: the pool's models and tokenizer, the parameters, where to save."""

    models: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    save: str | None = None  # default <root>/out


@dataclass
class Case:
    id: str
    setup: Callable[[Path], Setup]
    message: str  # a regex the error message matches
    exc: type[Exception] = ValueError


def _base(root: Path, family: str = "llama", **overrides) -> str:
    return save(make_tiny_model(family, **overrides), root / f"base_{family}")


def base_only(**params) -> Callable[[Path], Setup]:
    return lambda root: Setup({"_pretrained_": _base(root)}, params)


def base_and_source(**params) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        dense = make_tiny_model("llama")
        ft = save(perturbed(dense, 1), root / "ft")
        return Setup({"_pretrained_": save(dense, root / "base"), "ft": ft}, params)

    return setup


def other_source(**overrides) -> Callable[[Path], Setup]:
    family = overrides.pop("family", "llama")
    return lambda root: Setup(
        {
            "_pretrained_": _base(root),
            "odd": save(make_tiny_model(family, **overrides), root / "odd"),
        }
    )


def unsupported_base(root: Path) -> Setup:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    return Setup({"_pretrained_": save(gpt2, root / "gpt2")})


def non_finite(where: str, bad: float) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        dense = make_tiny_model("llama")
        broken = perturbed(dense, 1)
        with torch.no_grad():
            (dense if where == "base" else broken).model.layers[1].mlp.up_proj.weight[3, 4] = bad
        return Setup({"_pretrained_": save(dense, root / "b"), "ft": save(broken, root / "s")})

    return setup


def damaged_source(damage: str) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        dense = make_tiny_model("llama")
        src = Path(save(perturbed(dense, 1), root / "s"))
        file = src / "model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07garbage" * 20)
        return Setup({"_pretrained_": save(dense, root / "b"), "s": str(src)})

    return setup


def other_vocabulary(root: Path) -> Setup:
    dense = make_tiny_model("llama")
    base, src = save(dense, root / "b"), save(perturbed(dense, 1), root / "s")
    train_tokenizer(Path(base))
    train_tokenizer(Path(src), vocab_size=300, extra=" zebra quokka " * 50)
    return Setup({"_pretrained_": base, "s": src}, tokenizer=base)


def prompt_gates(mode: str, step: int) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        params: dict[str, Any] = {"gate_mode": mode, "num_experts": 2}
        tokenizer = None
        if step >= 1:
            params["prompts"] = {"expert_0": ["GNU"], "expert_1": ["software"]}
        if step == 2:
            params["prompts"] = {"expert_0": ["GNU"]}
            tokenizer = str(root / "tok")
            train_tokenizer(root / "tok")
        return Setup({"_pretrained_": _base(root)}, params, tokenizer)

    return setup


def missing(where: str) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        base = _base(root)
        if where == "base":
            return Setup({"_pretrained_": str(root / "nope")})
        if where == "source":
            return Setup({"_pretrained_": base, "ft": str(root / "nope")})
        if where == "tokenizer":
            return Setup({"_pretrained_": base}, tokenizer=str(root / "nope"))
        (root / "empty").mkdir()
        return Setup({"_pretrained_": str(root / "empty")})

    return setup


def save_under_a_file(root: Path) -> Setup:
    (root / "plain_file").write_text("x")
    return Setup(
        {"_pretrained_": _base(root)}, {"num_experts": 2}, save=str(root / "plain_file/out")
    )


def save_to_a_file(root: Path) -> Setup:
    (root / "out").write_text("x")
    return Setup({"_pretrained_": _base(root)}, {"num_experts": 2})


def overwrite_an_input(target: str) -> Callable[[Path], Setup]:
    def setup(root: Path) -> Setup:
        made = base_and_source(overwrite=True)(root / "models")
        save = {"base": made.models["_pretrained_"], "source": made.models["ft"]}.get(target)
        return Setup(made.models, made.params, save=save or str(root / "models"))

    return setup


BAD_PARAMETERS = [
    ({"base_alpha": 1.2}, r"base_alpha must lie in \[0, 1\], got 1.2"),
    (
        {"alpha_strategy": "cosine"},
        "Unknown alpha_strategy 'cosine'; valid: constant, linear_increase",
    ),
    ({"alpha_strategy": [0.1, 0.2, 0.3]}, "list of 3 values but the base model has 2 layers"),
    ({"alpha_strategy": [0.1, -0.2]}, "layer 1 has -0.2"),
    (
        {"gate_mode": "learned"},
        "Unknown gate_mode 'learned'; valid: orthogonal, random, uniform_random, hidden, cheap_embed",
    ),
    ({"granularity": 5}, "intermediate size 64 is not divisible by granularity 5"),
    ({"num_experts": 3}, "num_experts=3 but the pool gives 1 source experts \\+ the base expert"),
    ({"dtype": "float8"}, "Unknown dtype 'float8'"),
    ({"anchor_experts": ["nobody"]}, "anchor_experts names \\['nobody'\\] that are not experts"),
    *[
        ({"non_expert_merge": {"_target_": target}, **extra}, message)
        for target, extra, message in [
            ("fusion_bench.method.NoSuch", {}, "_target_ 'fusion_bench.method.NoSuch' cannot be"),
            ("torch.nn.Linear", {}, "_target_ 'torch.nn.Linear' is not a FusionBench algorithm"),
            (
                "fusion_bench.method.TaskArithmeticAlgorithm",
                {},
                r"TaskArithmeticAlgorithm\(\) cannot be created .*'scaling_factor'",
            ),
            (
                "fusion_bench.method.SimpleAverageAlgorithm",
                {"non_expert_tensors": "nothing_like_this"},
                "non_expert_tensors 'nothing_like_this' matches none of the base's 14 non-FFN",
            ),
            (
                "fusion_bench.method.TiesMergingAlgorithm",
                {"streaming": True},
                "TiesMergingAlgorithm is not elementwise .* so it cannot stream",
            ),
        ]
    ],
    (
        {
            "non_expert_merge": {"_target_": "fusion_bench.method.WeightedAverageAlgorithm"}
            | {"normalize": True, "weights": [1, 2, 3]}
        },
        "WeightedAverageAlgorithm failed on the non-expert tensors .*3 weights and 1 models",
    ),
    ({"non_expert_tensors": "self_attn"}, "non_expert_tensors selects .* non_expert_merge is base"),
    ({"non_expert_merge": "average"}, "non_expert_merge must be base or a FusionBench algorithm"),
]

CASES = [
    Case(
        "no_pretrained",
        lambda r: Setup({"de": _base(r)}),
        "no '_pretrained_' entry: add `_pretrained_:",
    ),
    Case(
        "unsupported_base",
        unsupported_base,
        "Unsupported base architecture 'gpt2'; supported dense bases: llama, mistral, qwen2, qwen3",
    ),
    Case(
        "unknown_architecture",
        base_only(architecture="deepseek"),
        "Unknown architecture 'deepseek'; valid: auto, mixtral, qwen2_moe, qwen3_moe",
    ),
    Case(
        "qwen3_into_mixtral",
        lambda r: Setup({"_pretrained_": _base(r, "qwen3")}, {"architecture": "mixtral"}),
        r"cannot represent base tensor 'model.layers.0.self_attn.[qk]_norm.weight' .* use architecture: qwen3_moe",
    ),
    Case(
        "qwen2_biases_into_mixtral",
        lambda r: Setup({"_pretrained_": _base(r, "qwen2")}, {"architecture": "mixtral"}),
        "cannot represent base tensor '.*bias'.*use architecture: qwen2_moe",
    ),
    Case(
        "source_family",
        other_source(family="mistral"),
        "Source 'odd' is a mistral model but the base is llama",
    ),
    Case("source_layers", other_source(layers=3), "Source 'odd' has 3 layers, the base has 2"),
    Case(
        "source_shape",
        other_source(intermediate_size=32),
        r"Source 'odd': tensor 'model.layers.0.mlp.down_proj.weight' has shape \[72, 32\], the base has \[72, 64\]",
    ),
    *[
        Case(
            f"{bad}_in_{where}",
            non_finite(where, float(bad)),
            f"Model '{'_pretrained_' if where == 'base' else 'ft'}': tensor "
            "'model.layers.1.mlp.up_proj.weight' contains NaN or Inf",
        )
        for where in ("base", "source")
        for bad in ("nan", "inf")
    ],
    Case(
        "vocabularies",
        other_vocabulary,
        "Source 's' has a tokenizer whose vocabulary differs from the base",
    ),
    *[
        Case(
            f"top_k_{k}",
            base_only(num_experts=2, experts_per_token=k),
            rf"experts_per_token={k} must lie in \[1, num_experts=2\]",
        )
        for k in (0, 3)
    ],
    Case(
        "too_many_orthogonal_rows",
        base_only(num_experts=73),
        "gate_mode 'orthogonal' needs at most hidden_size=72 distinct router rows but the plan has 73",
    ),
    *[
        Case(f"parameter_{i}", base_and_source(**params), message)
        for i, (params, message) in enumerate(BAD_PARAMETERS)
    ],
    Case(
        "non_expert_merge_without_sources",
        base_only(non_expert_merge="fusion_bench.method.SimpleAverageAlgorithm"),
        "non_expert_merge merges the pool's models, but the pool has only the base",
    ),
    Case(
        "experts_not_a_multiple",
        base_only(granularity=4, num_experts=6),
        "num_experts=6 is not a multiple of granularity 4",
    ),
    *[
        Case(f"{mode}_{step}", prompt_gates(mode, step), message.format(mode))
        for mode in ("hidden", "cheap_embed")
        for step, message in enumerate(
            [
                "gate_mode '{}' needs prompts",
                "gate_mode '{}' needs a tokenizer",
                "gate_mode '{}': expert 'expert_1' has no prompts",
            ]
        )
    ],
    Case(
        "save_under_a_file",
        save_under_a_file,
        "cannot write in .*plain_file: it is a file",
        NotADirectoryError,
    ),
    Case("save_to_a_file", save_to_a_file, "exists and is not a directory", FileExistsError),
    *[
        Case(
            f"{damage}_safetensors",
            damaged_source(damage),
            "Model 's': cannot open .*model.safetensors .*truncated or corrupt",
        )
        for damage in ("truncate", "garbage")
    ],
    Case("missing_base", missing("base"), "Model '_pretrained_': .*/nope does not exist"),
    Case("missing_source", missing("source"), "Model 'ft': .*/nope does not exist"),
    Case(
        "missing_tokenizer",
        missing("tokenizer"),
        "The model pool's tokenizer: .*/nope does not exist",
    ),
    Case(
        "empty_base", missing("empty"), "Model '_pretrained_': .*/empty holds none of config.json"
    ),
    *[
        Case(
            f"overwrite_{target}",
            overwrite_an_input(target),
            rf"save_checkpoint=.* {'contains' if target == 'parent' else 'is'} the directory of "
            rf"'{'ft' if target == 'source' else '_pretrained_'}'.*which this run reads",
        )
        for target in ("base", "source", "parent")
    ],
]


def snapshot(root: Path) -> dict[str, float]:
    """Every path under ``root`` with its modification time (to show nothing changed)."""
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


# Version-sensitive (errors from this major's configs before any work): also under 4.57.
@pytest.mark.cross_version
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(tmp_path, case):
    setup = case.setup(tmp_path)
    before = snapshot(tmp_path)
    algo = OrthogonalMoECTMergingAlgorithm(
        save_checkpoint=setup.save or str(tmp_path / "out"), **setup.params
    )
    with pytest.raises(case.exc, match=case.message):
        algo.run(pool(setup.models, tokenizer=setup.tokenizer))
    assert snapshot(tmp_path) == before


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def cli_overrides(setup: Setup, root: Path) -> list[str]:
    """The ``fusion_bench`` command line of a bad run."""
    argv = ["method=moe_ct_upcycling", "modelpool=CausalLMPool/moe_ct_upcycle", "taskpool=dummy"]
    argv += ["~modelpool.models", f"+modelpool.models={hydra_value(setup.models)}"]
    argv.append(f"modelpool.tokenizer={hydra_value(setup.tokenizer)}")
    argv += [f"method.{k}={hydra_value(v)}" for k, v in setup.params.items()]
    argv.append(f"method.save_checkpoint={hydra_value(setup.save or str(root / 'out'))}")
    logs = root.parent / f"{root.name}-logs"
    return argv + [
        f"hydra.run.dir={hydra_value(str(logs))}",
        f"path.log_dir={hydra_value(str(logs))}",
    ]


def run_fusion_bench(jobs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Run the ``fusion_bench`` CLI once per job, all in one process (tests/fusion_bench_driver.py)."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    out = subprocess.run(
        [sys.executable, str(TESTS / "fusion_bench_driver.py"), str(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]


def missing_text_source(root: Path) -> tuple[list[str], str]:
    """A task pool error (raised while evaluating): its overrides and message."""
    base = _base(root)
    train_tokenizer(Path(base))
    argv = cli_overrides(Setup({"_pretrained_": base}, {"num_experts": 2}, tokenizer=base), root)
    argv += ["taskpool=moe_text_files", f"+taskpool.sources.notes={root / 'nope.txt'}"]
    return argv, r"Text source '.*/nope.txt' does not exist"


def test_bad_input_through_fusion_bench_ends_with_the_message(tmp_path):
    """Each case above through the real CLI (and one of the task pool's): exit status 1,
    the plugin's one-line message among the last 3 lines of the output, nothing written."""
    jobs, befores = [], {}
    for case in CASES:
        root = tmp_path / case.id
        root.mkdir()
        setup = case.setup(root)
        befores[case.id] = snapshot(root)
        jobs.append(
            {"argv": cli_overrides(setup, root), "output": str(tmp_path / f"{case.id}.txt")}
        )
    (tmp_path / "taskpool").mkdir()
    argv, message = missing_text_source(tmp_path / "taskpool")
    jobs.append({"argv": argv, "output": str(tmp_path / "taskpool.txt")})
    run_fusion_bench(jobs, tmp_path)
    tail = Path(jobs[-1]["output"]).read_text().rstrip("\n").splitlines()[-3:]
    assert re.search(message, "\n".join(tail)), tail
    for case, job in zip(CASES, jobs[:-1], strict=True):
        text = Path(job["output"]).read_text()
        tail = "\n".join(text.rstrip("\n").splitlines()[-3:])
        assert Path(job["output"] + ".status").read_text() == "1", (case.id, text[-2000:])
        assert re.search(case.message, tail), (case.id, tail)
        assert snapshot(tmp_path / case.id) == befores[case.id], case.id


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_is_exact(dtype):
    from fusion_bench_moect.io.sources import _FINITE_CHUNK, all_finite

    values = torch.randn(3 * _FINITE_CHUNK + 5).to(dtype)
    assert all_finite(values) and all_finite(values[::3])
    huge = torch.full((10,), torch.finfo(dtype).max, dtype=dtype)  # a float32 sum overflows
    assert all_finite(huge) and all_finite(-huge)
    for where in (0, _FINITE_CHUNK - 1, _FINITE_CHUNK, values.numel() - 1):
        for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
            broken = values.clone()
            broken[where] = bad
            assert not all_finite(broken), (where, bad)
            strided = torch.stack([broken, broken], dim=1)[:, 0]
            assert not strided.is_contiguous() and not all_finite(strided)


# -- moe_ct_training: the same care (issue 29) ------------------------------------------------

TRAINING_PARAMETER_ERRORS = [
    (
        "learning_rate",
        {"learning_rate": -1e-4},
        r"learning_rate must lie in \(0, inf\), got -0.0001",
    ),
    ("max_steps", {"max_steps": 0}, r"max_steps must be >= 1 \(or -1 for no limit\), got 0"),
    ("stage", {"stage": "all"}, "Unknown stage 'all'; valid: router, experts, router_then_experts"),
    ("balancing", {"balancing": "loss"}, "Unknown balancing 'loss'; valid: aux_loss, bias"),
    (
        "warm_up",
        {"stage": "router_then_experts"},
        "stage router_then_experts needs router_warmup_steps >= 1",
    ),
]


def own_input(
    root: Path, base_dir: Path, tokenizer_dir: Path, which: str
) -> tuple[Path, Path, str]:
    """A starting model (a copy of ``base_dir``), a tokenizer directory and a
    ``save_checkpoint`` that would replace one of them: (base, tokenizer, target)."""
    base = Path(shutil.copytree(base_dir, root / "models" / "base"))
    tok = Path(shutil.copytree(tokenizer_dir, root / "tok"))
    (root / "link").symlink_to(base)
    target = {"input": base, "parent": root / "models", "symlink": root / "link", "tokenizer": tok}
    return base, tok, str(target[which])


@pytest.mark.parametrize("which", ["input", "parent", "symlink", "tokenizer"])
def test_training_refuses_to_replace_its_own_input(tmp_path, base_dir, tokenizer_dir, which):
    """Before: ``overwrite: true`` onto the starting MoE replaced it with the trained one.
    Refused before anything loads (a dense base stands in for the MoE), nothing changed."""
    from fusion_bench_moect.training import MoECTTrainingAlgorithm

    base, tok, target = own_input(tmp_path, base_dir, tokenizer_dir, which)
    before = snapshot(tmp_path)
    algo = MoECTTrainingAlgorithm(
        save_checkpoint=target,
        overwrite=True,
        accelerator="cpu",
        train_sources={"a": {"text": "x"}},
    )
    relation = "contains" if which == "parent" else "is"
    owner = "the pool's tokenizer" if which == "tokenizer" else "_pretrained_"
    with pytest.raises(
        ValueError, match=rf"save_checkpoint=.* {relation} the directory of '{owner}'"
    ):
        algo.run(pool({"_pretrained_": str(base)}, tokenizer=str(tok)))
    assert snapshot(tmp_path) == before


def training_overrides(root: Path, base: Path, tok: Path, params: dict[str, Any]) -> list[str]:
    """The ``fusion_bench`` command line of a bad ``moe_ct_training`` run."""
    argv = ["method=moe_ct_training", "modelpool=CausalLMPool/moe_ct_upcycle", "taskpool=dummy"]
    argv += [f"modelpool.models._pretrained_={base}", f"modelpool.tokenizer={tok}"]
    argv += ["fabric.accelerator=cpu", "fabric.loggers=null"]
    argv += [f"method.{k}={hydra_value(v)}" for k, v in params.items()]
    logs = root.parent / f"{root.name}-logs"
    return argv + [f"hydra.run.dir={hydra_value(str(logs))}"]


def test_training_errors_through_fusion_bench_are_as_compact_as_the_build_s(
    tmp_path, base_dir, tokenizer_dir
):
    """Before: 237-254 lines, the traceback printed twice, for a parameter checked when the
    method is made. Now as the build's equivalent error (base_alpha=1.2): exit status 1, the
    message on the last line but two (then Hydra's hint), no traceback, and no more lines
    than the build's, give or take the longer configuration printed first. Also the issue's
    own-input run, and the retired ``fabric=moe_fsdp`` preset, which names its successor."""
    base, tok, _ = own_input(tmp_path / "own", base_dir, tokenizer_dir, "input")
    reference = tmp_path / "build"
    reference.mkdir()
    build = Setup({"_pretrained_": str(base)}, {"base_alpha": 1.2})
    jobs = [(cli_overrides(build, reference), r"base_alpha must lie in \[0, 1\], got 1.2")]
    for name, params, message in TRAINING_PARAMETER_ERRORS:
        jobs.append((training_overrides(tmp_path / name, base, tok, params), message))
    own = {"save_checkpoint": str(base), "overwrite": True}
    jobs.append(
        (
            training_overrides(tmp_path / "own_input", base, tok, own),
            r"save_checkpoint=.* is the directory of '_pretrained_'",
        )
    )
    jobs.append(
        (
            training_overrides(tmp_path / "fsdp1", base, tok, {}) + ["fabric=moe_fsdp"],
            "fabric=moe_fsdp is retired .*; use fabric=moe_fsdp2",
        )
    )
    before = snapshot(tmp_path / "own")
    outputs = [str(tmp_path / f"job{i}.txt") for i in range(len(jobs))]
    run_fusion_bench(
        [{"argv": argv, "output": out} for (argv, _), out in zip(jobs, outputs, strict=True)],
        tmp_path,
    )
    lines = [Path(out).read_text().rstrip("\n").splitlines() for out in outputs]
    for (argv, message), text, out in zip(jobs, lines, outputs, strict=True):
        assert Path(out + ".status").read_text() == "1", (argv, text[-20:])
        assert re.search(message, text[-3]), (argv, text[-3:])
        assert text[-2:] == lines[0][-2:], text[-2:]  # Hydra's hint, as for the build
        assert not any("Traceback" in line for line in text), argv
        assert len(beyond_configuration(text)) <= len(beyond_configuration(lines[0])), argv
    assert snapshot(tmp_path / "own") == before


def beyond_configuration(lines: list[str]) -> list[str]:
    """The output lines other than the configuration FusionBench prints first (its tree and
    "Instantiate by calling" boxes, whose length follows the parameter count) and the wrapped
    continuations of log records. Every log record counts once, whether or not rich printed its
    time (it does only when the second changed, so a record that starts ``[time]`` in one run
    starts with blanks in the next)."""
    kept = []
    for line in lines:
        if line[:1] in "│├└╭╰":
            continue
        if LOG_RECORD.match(line) or not line.startswith("    "):
            kept.append(line)
    return kept


#: The first line of a rich log record: its time (or the blanks that stand for the same time),
#: then the level.
LOG_RECORD = re.compile(r"^(\[[^\]]*\]| +) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def test_the_pools_take_fusion_bench_s_torch_dtype_spelling(tmp_path, base_dir):
    """FusionBench's configs write ``model_kwargs.torch_dtype``; ours wrote only ``dtype``, so
    the override failed with Hydra's "Could not override". Set, it wins over the pool's
    default ``dtype``."""
    out = tmp_path / "moe"
    argv = ["method=moe_ct_upcycling", "modelpool=CausalLMPool/moe_ct_upcycle", "taskpool=dummy"]
    argv += [
        f"modelpool.models._pretrained_={base_dir}",
        "modelpool.model_kwargs.torch_dtype=float16",
    ]
    argv += ["method.num_experts=2", f"method.save_checkpoint={out}"]
    argv += [f"hydra.run.dir={tmp_path / 'logs'}", f"path.log_dir={tmp_path / 'logs'}"]
    run_fusion_bench([{"argv": argv, "output": str(tmp_path / "run.txt")}], tmp_path)
    text = (tmp_path / "run.txt").read_text()
    assert (tmp_path / "run.txt.status").read_text() == "0", text[-3000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert "deprecated" not in text
