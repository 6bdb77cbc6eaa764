"""Plumbing of the MoE-CT study (study/, beside the package) on tiny Llama models."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_bench_moect.paths import cache_root
from study.common import gain_retained, mean_std, specialisation

SMOLLM2 = cache_root() / "SmolLM2-135M-Instruct"


def test_gain_retained_and_mean_std():
    assert gain_retained(10.0, 10.0, 5.0) == pytest.approx(0.0)
    assert gain_retained(5.0, 10.0, 5.0) == pytest.approx(1.0)
    assert gain_retained(20.0, 10.0, 5.0) == pytest.approx(-1.0)
    assert gain_retained(3.0, 5.0, 5.0) is None
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([1.0]) == (1.0, None)
    spec = specialisation(
        {"en": [0.5, 0.3, 0.2], "de": [0.2, 0.6, 0.2]}, ["_pretrained_", "de", "x"]
    )
    assert spec["own_share_de"] == 0.6
    assert spec["specialisation"] == pytest.approx(0.3)


def test_grid_rows_design():
    from study.grid import grid_rows

    rows = grid_rows(quick=False, focus_seeds=(42, 1))
    names = [r["name"] for r in rows if r["group"] == "main"]
    assert names[0] == "off" and len(names) == 13
    ablations = [r["name"] for r in rows if r["group"] == "ablation"]
    assert "u_shaped@0.8 aux1.0" in ablations and "constant@0.8 qwen2_moe" in ablations
    sweep = [r["params"]["router_aux_scale"] for r in rows if r["group"] == "aux-sweep"]
    assert sweep == [1.5, 2.0, 3.0]
    seeded = [r for r in rows if r["group"].endswith("-seed")]
    assert len(seeded) == 8 and all(r["params"]["seed"] == 1 for r in seeded)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    if not (SMOLLM2 / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not prepared")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    dirs = {}
    for name in ("base", "de"):
        if name != "base":
            with torch.no_grad():
                for n, p in base.named_parameters():
                    if ".mlp." in n:
                        p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def test_grid_and_collapse_and_report_on_tiny_models(tiny_models, tmp_path):
    from study.collapse import combine_runs, run_collapse
    from study.grid import _row, run_grid
    from study.report import write_report

    experts = {"de": tiny_models["de"]}
    text = {
        "en": "The package manager installs software and keeps the system up to date. " * 8,
        "de": "Die Paketverwaltung installiert Software und hält das System aktuell. " * 8,
    }
    sources = {lang: {"text": t} for lang, t in text.items()}
    prompts = {lang: [t[:80]] for lang, t in text.items()}
    rows = [
        _row("off", "main", moe_ct_mode=False, alpha_strategy="constant", base_alpha=1.0),
        _row("u_shaped@0.8", "main", alpha_strategy="u_shaped", base_alpha=0.8),
    ]
    grid = run_grid(
        tiny_models["base"], experts, tmp_path / "grid", rows, eval_tokens=40, window_length=20
    )
    assert len(grid["rows"]) == 2
    m = grid["rows"][1]["metrics"]
    assert m["ppl_en"] > 0 and m["mean_anchor_share"] is not None and "own_share_de" in m
    assert set(grid["references"]) == {"base", "de"}
    again = run_grid(
        tiny_models["base"],
        experts,
        tmp_path / "grid",
        rows,
        eval_tokens=40,
        window_length=20,
        resume=True,
    )
    assert again["complete"] and [r["metrics"] for r in again["rows"]] == [
        r["metrics"] for r in grid["rows"]
    ]

    kwargs = dict(
        seeds=(0,),
        steps=2,
        batch_size=1,
        seq_len=16,
        train_tokens_per_language=200,
        eval_tokens=40,
        window_length=20,
        eval_sources=sources,
        train_sources=sources,
        prompts=prompts,
    )
    collapse = run_collapse(
        tiny_models["base"],
        experts,
        tmp_path / "collapse",
        gate_modes=("orthogonal", "hidden"),
        aux_loss_coefs=(0.01, 0.0),
        **kwargs,
    )
    assert len(collapse["runs"]) == 4
    assert [(r["gate_mode"], r["aux_loss_coef"]) for r in collapse["runs"]] == [
        ("orthogonal", 0.01),
        ("orthogonal", 0.0),
        ("hidden", 0.01),
        ("hidden", 0.0),
    ]
    assert len(collapse["runs"][0]["history"]) == 2
    curve = collapse["runs"][0]["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2]
    assert all(-1.0 <= c["specialisation"] <= 1.0 and c["mean_cv"] >= 0 for c in curve)
    # without the load-balancing loss the logged aux loss carries no weight in the loss
    off = collapse["runs"][1]["history"]
    assert all(h["loss"] == pytest.approx(h["lm_loss"], abs=1e-6) for h in off)
    # runs of a parallel invocation (another gate mode, one coefficient) join the report
    run_collapse(
        tiny_models["base"],
        experts,
        tmp_path / "other",
        gate_modes=("uniform_random",),
        aux_loss_coefs=(0.01,),
        **kwargs,
    )
    both = combine_runs(collapse, [tmp_path / "other" / "collapse.json"])
    assert [r["gate_mode"] for r in both["runs"]][-1] == "uniform_random"
    assert len(both["runs"]) == 5 and both["complete"]
    run_collapse(
        tiny_models["base"],
        experts,
        tmp_path / "longer",
        gate_modes=("random",),
        **{**kwargs, "steps": 3},
    )
    with pytest.raises(ValueError, match="other settings"):
        combine_runs(collapse, [tmp_path / "longer" / "collapse.json"])
    collapse = both
    doc = tmp_path / "study.md"
    write_report(grid, collapse, {}, doc, tmp_path / "img", timings={"grid": 1.0})
    text = doc.read_text()
    assert "orthogonal, no aux loss" in text and "Held-out routing during training" in text
    assert (tmp_path / "img" / "collapse_curves.png").exists()
    assert "<!-- BEGIN GENERATED -->" in text and "u_shaped@0.8" in text
    assert (tmp_path / "img" / "forgetting_vs_plasticity.png").exists()
    assert json.loads((tmp_path / "img" / "results.json").read_text())["grid"]


def test_run_log_resumes_only_matching_runs(tmp_path):
    from study.runs import RunLog

    runs = RunLog(tmp_path / "all.json", {"settings": {"a": 1}}, "runs", 2, order=lambda r: r["i"])
    runs.record(tmp_path / "2.json", {"i": 2, "settings": {"a": 1}})
    runs.keep({"i": 1, "settings": {"a": 1}})
    summary = json.loads((tmp_path / "all.json").read_text())
    assert [r["i"] for r in summary["runs"]] == [2]  # written before keep()
    assert summary["complete"] is False and summary["planned_runs"] == 2
    final = runs.dump()
    assert [r["i"] for r in final["runs"]] == [1, 2] and final["complete"] is True
    assert RunLog.finished(tmp_path / "2.json", settings={"a": 1})["i"] == 2
    assert RunLog.finished(tmp_path / "2.json", settings={"a": 2}) is None
    assert RunLog.finished(tmp_path / "1.json") is None


def test_train_expert_fine_tunes_the_mlp_and_resumes(tiny_models, tmp_path):
    from fusion_bench_moect.eval.text import debian_reference_available
    from study.experts import (
        ExpertSettings,
        is_built,
        train_expert,
    )

    if not debian_reference_available("de"):
        pytest.skip("Debian Reference (de) not installed")
    settings = ExpertSettings(
        steps=3, batch_size=1, seq_len=16, max_train_tokens=400, eval_tokens=40, dtype="float32"
    )
    marker = train_expert("de", settings, base_dir=tiny_models["base"], root=tmp_path)
    assert len(marker["losses"]) == 3 and marker["first_loss"] == marker["losses"][0]
    assert marker["trainable_parameters"] == 2 * 3 * 32 * 64  # 2 layers x gate/up/down (MLP only)
    assert is_built("de", settings, tmp_path)
    assert train_expert("de", settings, base_dir=tiny_models["base"], root=tmp_path) == marker


def test_trained_runs_merge_then_train_router_then_experts(tiny_models, tmp_path):
    from study.trained import POINTS, run_trained, trained_rows

    experts = {"de": tiny_models["de"]}
    text = {
        "en": "The package manager installs software and keeps the system up to date. " * 8,
        "de": "Die Paketverwaltung installiert Software und hält das System aktuell. " * 8,
    }
    sources = {lang: {"text": t} for lang, t in text.items()}
    rows = trained_rows([7], ["off", "u_shaped@0.8"])
    assert [(r["name"], r["params"]["seed"]) for r in rows] == [("off", 7), ("u_shaped@0.8", 7)]
    kwargs = dict(
        router_steps=2,
        experts_steps=3,
        batch_size=1,
        seq_len=16,
        train_tokens_per_language=200,
        eval_tokens=40,
        window_length=20,
        eval_sources=sources,
        train_sources=sources,
    )
    result = run_trained(tiny_models["base"], experts, tmp_path, rows, **kwargs)
    assert result["complete"] and len(result["runs"]) == 2
    run = result["runs"][1]
    assert list(run["points"]) == list(POINTS)
    assert [len(run["histories"][s]) for s in ("router", "experts")] == [2, 3]
    # each stage changes the model, so the held-out numbers move
    ppl = [run["points"][p]["ppl_de"] for p in POINTS]
    assert ppl[0] != ppl[1] != ppl[2]
    again = run_trained(tiny_models["base"], experts, tmp_path, rows, resume=True, **kwargs)
    assert [r["points"] for r in again["runs"]] == [r["points"] for r in result["runs"]]
    from study.report import write_report

    doc = write_report(None, None, {}, tmp_path / "study.md", tmp_path / "img", trained=result)
    assert "Claim 2 after continued training" in doc.read_text()
    assert (tmp_path / "img" / "trained.png").exists()
    with pytest.raises(ValueError, match="Unknown grid rows"):
        trained_rows([1], ["u_shaped@0.9"])
