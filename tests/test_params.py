"""The parameter schema: generated listings, field checks, the lean CLI's parsing, defaults."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturbed, pool

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.inspection import moe_block
from fusion_bench_moect.params import MoECTConfig, method_yaml, parameter_table

REPO = Path(__file__).resolve().parents[1]


def test_committed_method_yaml_is_the_generated_one():
    assert (REPO / "config/method/moe_ct_upcycling.yaml").read_text() == method_yaml(), (
        'regenerate: python -c "from fusion_bench_moect.params import method_yaml; '
        "print(method_yaml(), end='')\" > config/method/moe_ct_upcycling.yaml"
    )


def test_docs_parameter_table_is_the_generated_one():
    assert parameter_table() in (REPO / "docs/algorithm.md").read_text()


def test_hydra_instantiates_the_yaml_into_the_schema_defaults():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    algo = instantiate(OmegaConf.load(REPO / "config/method/moe_ct_upcycling.yaml"))
    assert isinstance(algo, OrthogonalMoECTMergingAlgorithm)
    assert algo.moect_config == MoECTConfig()
    assert algo.config.granularity == 1 and algo.config.router_aux_scale is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"drop_ratio": 1.0}, r"drop_ratio must lie in \[0, 1\), got 1.0"),
        ({"shared_expert_share": -0.5}, r"shared_expert_share must lie in \[0, 1\], got -0.5"),
        ({"granularity": 0}, "granularity must be >= 1, got 0"),
        ({"granularity": 2.5}, "granularity must be an integer, got 2.5"),
        ({"num_experts": 0}, "num_experts must be >= 1, got 0"),
        ({"router_aux_scale": 0.0}, "router_aux_scale must be a positive number, got 0.0"),
        ({"router_aux_scale": float("inf")}, "router_aux_scale must be a positive number"),
        ({"gate_mode": "learned"}, "Unknown gate_mode 'learned'; valid: orthogonal, random"),
        ({"alpha_strategy": "cosine"}, "Unknown alpha_strategy 'cosine'"),
        ({"moe_ct_mode": "no"}, "moe_ct_mode must be true or false, got 'no'"),
        ({"n_group": 0}, "n_group must be >= 1, got 0"),
        ({"topk_group": 1.5}, "topk_group must be an integer, got 1.5"),
    ],
)
def test_field_checks_name_the_parameter(values, message):
    with pytest.raises(ValueError, match=message):
        MoECTConfig(**values)


def test_field_checks_normalise_numbers():
    config = MoECTConfig(granularity=2.0, base_alpha=1, anchor_experts=("a", "b"))
    assert config.granularity == 2 and isinstance(config.granularity, int)
    assert config.base_alpha == 1.0 and isinstance(config.base_alpha, float)
    assert config.record()["anchor_experts"] == ["a", "b"]


def test_lean_cli_parses_every_form_into_the_schema():
    from fusion_bench_moect.cli.upcycle import build_parser
    from fusion_bench_moect.params import config_from_args

    args = build_parser().parse_args(["base", "out"])
    assert config_from_args(args) == MoECTConfig()
    args = build_parser().parse_args(
        ["base", "out", "--no-moe-ct", "--no-base-expert", "--permute-neurons", "--overwrite"]
        + ["--noise-scale", "a=0.1,b=0.2", "--residual-scale", "0.5"]
        + ["--alpha-strategy", "0.1,0.2", "--anchor-experts", "a", "b", "--granularity", "2"]
    )
    config = config_from_args(args, save_checkpoint="out", streaming=True)
    assert config == MoECTConfig(
        moe_ct_mode=False,
        include_base_expert=False,
        permute_neurons=True,
        overwrite=True,
        noise_scale={"a": 0.1, "b": 0.2},
        residual_scale=0.5,
        alpha_strategy=[0.1, 0.2],
        anchor_experts=["a", "b"],
        granularity=2,
        save_checkpoint="out",
        streaming=True,
    )


def test_lean_cli_help_is_generated_from_the_schema_and_agrees_with_the_parser():
    """Each flag's help names the value it sets (parsing the flag gives that value); each
    option with choices lists exactly the choices the parser accepts."""
    import re

    from fusion_bench_moect.cli.upcycle import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if a.dest in MoECTConfig.names()]
    assert {a.dest for a in actions} >= {"moe_ct_mode", "include_base_expert", "gate_mode"}
    for action in actions:
        if action.nargs == 0:  # a flag
            said = re.match(rf"set {action.dest} to (true|false)", action.help)
            assert said, action.help
            parsed = getattr(parser.parse_args(["b", "o", action.option_strings[0]]), action.dest)
            assert parsed == (said.group(1) == "true"), action.option_strings
        elif action.choices:
            listed = action.help.split(": ", 1)[1].split(" (default")[0].split(" | ")
            assert listed == list(action.choices), action.help
    gate = next(a for a in actions if a.dest == "gate_mode")
    assert "hidden" not in gate.help and "cheap_embed" not in gate.help
    no_moe_ct = next(a for a in actions if a.dest == "moe_ct_mode")
    assert no_moe_ct.option_strings == ["--no-moe-ct"]
    assert no_moe_ct.help.startswith("set moe_ct_mode to false (default true: fuse each source")


def test_lean_cli_refuses_prompt_gates():
    out = subprocess.run(
        [sys.executable, "-m", "fusion_bench_moect.cli.upcycle", "b", "o", "--gate-mode", "hidden"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "invalid choice: 'hidden'" in out.stderr


def test_default_anchor_scale_is_quiet_and_scales_only_with_an_anchor(saved, caplog, tiny_model):
    """router_aux_scale null: 1.1 on the base expert's rows when merging, nothing (and no
    warning) in pure upcycling."""
    dense = tiny_model("llama")
    base = saved(dense, "b")
    models = {"_pretrained_": base, "ft": saved(perturbed(dense, 1), "ft")}
    with caplog.at_level(logging.WARNING):
        default = OrthogonalMoECTMergingAlgorithm(dtype="float32").run(pool(models))
        explicit = OrthogonalMoECTMergingAlgorithm(router_aux_scale=1.1, dtype="float32").run(
            pool(models)
        )
        upcycled = OrthogonalMoECTMergingAlgorithm(num_experts=4).run(pool({"_pretrained_": base}))
        plain = OrthogonalMoECTMergingAlgorithm(num_experts=4, router_aux_scale=1.0).run(
            pool({"_pretrained_": base})
        )
    assert not [r for r in caplog.records if r.name.startswith("fusion_bench_moect")]

    def router(model, layer):
        return moe_block(model.model.layers[layer]).gate.weight

    for layer in range(2):
        assert torch.equal(router(default, layer), router(explicit, layer))
        assert torch.equal(router(upcycled, layer), router(plain, layer))
    assert default.config.moe_ct["params"]["router_aux_scale"] is None


def test_path_parameters_expand_home_and_variables_once(monkeypatch, tmp_path, base_dir):
    """``~`` and ``$VARS`` in every path parameter of both methods and the lean CLI, expanded
    where the schema reads them. Before, the writer expanded ``~`` but the build then read
    ``~/x/model.safetensors`` literally and failed (training: after training ended)."""
    from fusion_bench_moect.cli.upcycle import _parse_sources, build_parser
    from fusion_bench_moect.training.config import TrainingConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOECT_TEST_DIR", str(tmp_path / "var"))
    assert MoECTConfig(save_checkpoint="~/x").save_checkpoint == str(tmp_path / "x")
    paths = ("save_checkpoint", "checkpoint_dir", "ckpt_path", "tokenizer")
    training = TrainingConfig(**{name: f"$MOECT_TEST_DIR/{name}" for name in paths})
    assert [getattr(training, name) for name in paths] == [f"{tmp_path}/var/{n}" for n in paths]
    args = build_parser().parse_args(["~/base", "$MOECT_TEST_DIR/out", "--tokenizer", "~/tok"])
    assert (args.base, args.output, args.tokenizer) == (
        f"{tmp_path}/base",
        f"{tmp_path}/var/out",
        f"{tmp_path}/tok",
    )
    assert _parse_sources(["de=~/de"]) == {"de": tmp_path / "de"}
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint="~/moe").run(
        pool({"_pretrained_": str(base_dir)})
    )
    assert (tmp_path / "moe" / "model.safetensors").is_file() and moe is not None
    assert not (tmp_path / "~").exists()


def test_lean_cli_help_speaks_of_its_own_flags():
    """Issue 29: the usage names the console script; no option's help speaks of the model
    pool, of YAML keys or of YAML syntax; every option has help; a flag taking names refuses
    none; a pipeline error names OUTPUT and --overwrite, not the method's keys."""
    from fusion_bench_moect.cli.upcycle import build_parser, in_cli_words

    parser = build_parser()
    text = parser.format_help()
    assert text.startswith("usage: moect-upcycle ")
    for word in (
        "model_kwargs",
        "save_checkpoint",
        "overwrite: true",
        "{source",
        "{expert",
        "pool",
    ):
        assert word not in text, word
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions]
    with pytest.raises(SystemExit):
        parser.parse_args(["b", "o", "--anchor-experts"])
    said = in_cli_words(
        "save_checkpoint=/x is not empty; choose a new directory or set overwrite: true to replace it."
    )
    assert (
        said == "OUTPUT=/x is not empty; choose a new directory or pass --overwrite to replace it."
    )
