"""MoETextTaskPool on tiny real transformers models (dense Llama, Mixtral, Qwen2/3-MoE)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import real_text

from fusion_bench_moect.eval.routing import selection_counts
from fusion_bench_moect.eval.taskpool import MoETextTaskPool
from fusion_bench_moect.inspection import describe_moe

# Version-sensitive (routing captured from this major's MoE blocks): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "gpl.txt"
    path.write_text(real_text())
    return path


def make_pool(tokenizer_dir, sources, **kwargs) -> MoETextTaskPool:
    kwargs.setdefault("show_progress", False)
    return MoETextTaskPool(sources=sources, tokenizer=str(tokenizer_dir), **kwargs)


def manual_perplexity(model, tokenizer, text: str, max_tokens: int, window: int) -> float:
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            piece = torch.tensor([ids[start : start + window]])
            if piece.shape[1] < 2:
                continue
            loss = model(piece, labels=piece).loss.item()
            total += loss * (piece.shape[1] - 1)
            count += piece.shape[1] - 1
    return math.exp(total / count)


def test_dense_perplexity_matches_manual_windows(tokenizer_dir, text_file, tiny_model):
    model = tiny_model("llama", layers=2)
    pool = make_pool(
        tokenizer_dir,
        {"gpl": str(text_file), "inline": {"text": real_text()[1000:3000]}},
        max_tokens_per_source=100,
        window_length=32,
        batch_size=3,
    )
    report = pool.evaluate(model)
    tokenizer = pool.load_tokenizer()
    assert report["model"]["is_moe"] is False and "routing" not in report
    # 100 tokens -> windows of 32, 32, 32, 4 -> 31 * 3 + 3 scored tokens.
    assert report["sources"]["gpl"]["scored_tokens"] == 96
    assert report["sources"]["gpl"]["windows"] == 4
    expected = manual_perplexity(model, tokenizer, text_file.read_text(), 100, 32)
    assert report["perplexity"]["gpl"] == pytest.approx(expected, rel=1e-5)
    expected_inline = manual_perplexity(model, tokenizer, real_text()[1000:3000], 100, 32)
    assert report["perplexity"]["inline"] == pytest.approx(expected_inline, rel=1e-5)
    nll = [math.log(report["perplexity"][k]) * 96 for k in ("gpl", "inline")]
    assert report["overall_perplexity"] == pytest.approx(math.exp(sum(nll) / 192), rel=1e-9)
    assert report["settings"]["add_bos"] is False
    assert report["plots"] == {} and "references" not in report  # no program, no output_dir
    json.dumps(report, allow_nan=False)


def test_padding_is_excluded_from_loss_and_routing(tokenizer_dir, text_file, tiny_model):
    model = tiny_model("mixtral", layers=3)
    reports = [
        make_pool(
            tokenizer_dir,
            {"gpl": str(text_file)},
            max_tokens_per_source=150,
            window_length=40,
            batch_size=b,
        ).evaluate(model)
        for b in (1, 4)  # batch 4 pads the ragged last window
    ]
    one, padded = reports
    assert padded["perplexity"]["gpl"] == pytest.approx(one["perplexity"]["gpl"], rel=1e-5)
    assert one["routing"]["overall"]["tokens"] == 150
    for a, b in zip(one["routing"]["layers"], padded["routing"]["layers"], strict=True):
        assert a["shares"] == b["shares"]
        assert sum(a["shares"]) == pytest.approx(1.0)


def test_routing_counts_match_the_routers_own_choice(tokenizer_dir, text_file, tiny_model):
    model = tiny_model("mixtral", seed=3, layers=3)
    pool = make_pool(
        tokenizer_dir, {"gpl": str(text_file)}, max_tokens_per_source=64, window_length=64
    )
    report = pool.evaluate(model)
    ids = pool.load_windows(pool.load_tokenizer())["gpl"][0]
    # Independent path: capture each router's input, apply its weight, take top-k.
    inputs = []
    handles = [
        moe_router.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
        for moe_router in describe_moe(model).routers
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    for layer, (hidden, moe_router) in enumerate(
        zip(inputs, describe_moe(model).routers, strict=True)
    ):
        logits = hidden.reshape(-1, hidden.shape[-1]) @ moe_router.weight.T
        counts = selection_counts(logits, 2)
        assert report["routing"]["layers"][layer]["shares"] == pytest.approx(
            (counts / counts.sum()).tolist()
        )
    layer = report["routing"]["layers"][0]
    for key in (
        "cv",
        "max_violation",
        "load_entropy",
        "router_entropy",
        "gini",
        "condition_number",
    ):
        assert isinstance(layer[key], float), key
    assert report["model"]["num_experts"] == 4 and report["model"]["experts_per_token"] == 2


def test_record_gives_anchor_share_alpha_and_plots(tokenizer_dir, text_file, tmp_path, tiny_model):
    model = tiny_model("mixtral", layers=3)
    model.config.moe_ct = {
        "version": 1,
        "architecture": "mixtral",
        "experts": ["base", "de", "fr", "en"],
        "expert_sources": ["_pretrained_", "de", "fr", "en"],
        "anchor_experts": [0],
        "alphas": [0.8, 0.1, 0.8],
        "granularity": 1,
        "params": {"base_alpha": 0.8},
    }
    pool = make_pool(
        tokenizer_dir,
        {"gpl": str(text_file)},
        max_tokens_per_source=64,
        window_length=32,
        output_dir=str(tmp_path / "plots"),
    )
    report = pool.evaluate(model)
    layers = report["routing"]["layers"]
    assert [layer["alpha"] for layer in layers] == [0.8, 0.1, 0.8]
    assert [layer["layer"] for layer in layers] == [0, 1, 2]
    assert layers[1]["anchor_share"] == pytest.approx(layers[1]["shares"][0])
    overall = report["routing"]["overall"]
    assert overall["anchor_experts"] == [0] and overall["anchor_balanced_share"] == 0.25
    assert report["model"]["moe_ct"]["experts"] == ["base", "de", "fr", "en"]
    for kind in ("expert_load", "alpha_schedule"):
        with open(report["plots"][kind], "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(
    ("family", "overrides", "moe_layers", "shared"),
    [
        ("qwen2_moe", {"mlp_only_layers": [1]}, [0, 2], True),
        ("qwen3_moe", {"decoder_sparse_step": 2}, [1], False),
    ],
)
def test_qwen_moe_layers_and_shared_expert(
    tokenizer_dir, text_file, family, overrides, moe_layers, shared, tiny_model
):
    model = tiny_model(family, layers=3, **overrides)
    report = make_pool(
        tokenizer_dir,
        {"gpl": str(text_file)},
        max_tokens_per_source=48,
        window_length=24,
        batch_size=2,
    ).evaluate(model)
    assert [layer["layer"] for layer in report["routing"]["layers"]] == moe_layers
    assert report["model"]["shared_expert"] is shared
    assert report["routing"]["overall"]["tokens"] == 48


def test_bos_is_prepended_when_asked(tokenizer_dir, text_file, tiny_model):
    model = tiny_model("llama", layers=1)
    pool = make_pool(
        tokenizer_dir,
        {"gpl": str(text_file)},
        max_tokens_per_source=30,
        window_length=16,
        add_bos=True,
    )
    tokenizer = pool.load_tokenizer()
    tokenizer.bos_token = tokenizer.eos_token
    windows = pool.load_windows(tokenizer)["gpl"]
    assert all(w[0] == tokenizer.bos_token_id for w in windows)
    assert [len(w) for w in windows] == [16, 16]  # 15 + 15 text tokens
    assert pool.evaluate(model)["sources"]["gpl"]["scored_tokens"] == 30


def test_bad_settings_and_missing_tokenizer(text_file, tiny_model):
    with pytest.raises(ValueError, match="at least one text source"):
        MoETextTaskPool(sources={})
    with pytest.raises(ValueError, match="window_length"):
        MoETextTaskPool(sources={"a": str(text_file)}, window_length=1)
    pool = MoETextTaskPool(sources={"a": str(text_file)}, show_progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        pool.evaluate(tiny_model("llama", layers=1))


def fusion_program(base_dir, tokenizer_dir, text_file, log_dir):
    """A FabricModelFusionProgram that upcycles ``base_dir`` into 4 experts and evaluates it
    with our task pool, logging to ``log_dir``."""
    from fusion_bench.programs import FabricModelFusionProgram
    from omegaconf import DictConfig

    def node(target: str, **values) -> DictConfig:
        return DictConfig({"_target_": target, **values})

    logger = node(
        "lightning.fabric.loggers.TensorBoardLogger", root_dir=str(log_dir), name="", version=""
    )
    return FabricModelFusionProgram(
        method=node("fusion_bench_moect.OrthogonalMoECTMergingAlgorithm", num_experts=4),
        modelpool=node(
            "fusion_bench.modelpool.CausalLMPool",
            models={"_pretrained_": str(base_dir)},
            tokenizer=str(tokenizer_dir),
            model_kwargs={"dtype": "float32"},
        ),
        taskpool=node(
            "fusion_bench_moect.eval.taskpool.MoETextTaskPool",
            sources={"gpl": str(text_file)},
            max_tokens_per_source=96,
            window_length=48,
            show_progress=False,
        ),
        fabric=node(
            "lightning.Fabric", _recursive_=True, accelerator="cpu", devices=1, loggers=logger
        ),
        print_config=False,
        report_save_path="{log_dir}/program_report.json",
    )


def test_through_fusion_bench_program(base_dir, tokenizer_dir, text_file, tmp_path):
    """A real FabricModelFusionProgram run: upcycle, evaluate, compare with _pretrained_."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    log_dir = tmp_path / "logs"
    program = fusion_program(base_dir, tokenizer_dir, text_file, log_dir)
    # FabricModelFusionProgram.run() reads the Hydra run directory, as under the CLI.
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    hydra_cfg.hydra.runtime.output_dir = str(log_dir)
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        result = program.run()
    finally:
        HydraConfig.instance().cfg = None
    saved = json.loads((log_dir / "program_report.json").read_text())
    assert saved == result["report"]
    assert saved["model"]["is_moe"] and saved["model"]["num_experts"] == 4
    assert saved["references"]["_pretrained_"]["model"]["is_moe"] is False
    assert saved["perplexity_ratio"]["gpl"] == pytest.approx(1.0, abs=1e-5)  # upcycling preserves
    assert len(saved["routing"]["layers"]) == 2
    assert saved["plots"]["expert_load"] == str(log_dir / "expert_load.png")
    assert (log_dir / "alpha_schedule.png").read_bytes()[:8] == PNG_SIGNATURE


def test_reports_print_with_fusionbench_printer(capsys):
    """FusionBench's print_json indexes [0] of every list; empty lists are dropped."""
    from fusion_bench.utils.json import print_json

    from fusion_bench_moect.eval.taskpool import without_empty_lists

    report = {"dead_experts": [], "layers": [{"dead_experts": [], "cv": 0.1}], "shares": [0.5, 0.5]}
    clean = without_empty_lists(report)
    assert clean == {"layers": [{"cv": 0.1}], "shares": [0.5, 0.5]}
    print_json(clean, print_type=False)
    assert "cv: 0.1" in capsys.readouterr().out
    with pytest.raises(IndexError):
        print_json(report, print_type=False)
