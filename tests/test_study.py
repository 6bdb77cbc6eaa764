"""Plumbing of the MoE-CT study (study/, beside the package) on tiny Llama models."""

from __future__ import annotations

import json

import pytest
from helpers import perturbed

from study.common import gain_retained, mean_std, specialisation


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


#: Tiny stand-ins for the Debian Reference: English and German text.
TEXT = {
    "en": "The package manager installs software and keeps the system up to date. " * 8,
    "de": "Die Paketverwaltung installiert Software und hält das System aktuell. " * 8,
}
SOURCES = {lang: {"text": t} for lang, t in TEXT.items()}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_dir, tiny_model):
    """A tiny Llama with SmolLM2's tokenizer (the study's) and a German "expert" of it."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tiny_model(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    dirs = {}
    for name, model in (("base", base), ("de", perturbed(base, 1, scale=0.01))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def grid(tiny_models, tmp_path_factory):
    """Two grid rows (MoE-CT off, u_shaped@0.8) merged and evaluated, then resumed."""
    from study.grid import _row, run_grid

    rows = [
        _row("off", "main", moe_ct_mode=False, alpha_strategy="constant", base_alpha=1.0),
        _row("u_shaped@0.8", "main", alpha_strategy="u_shaped", base_alpha=0.8),
    ]
    out = tmp_path_factory.mktemp("grid")
    args = (tiny_models["base"], {"de": tiny_models["de"]}, out, rows)
    first = run_grid(*args, eval_tokens=40, window_length=20)
    return first, run_grid(*args, eval_tokens=40, window_length=20, resume=True)


#: What every tiny training run shares: windows of 16 tokens, one per step, the tiny texts.
TINY_RUN = dict(
    batch_size=1,
    seq_len=16,
    train_tokens_per_language=200,
    eval_tokens=40,
    window_length=20,
    eval_sources=SOURCES,
    train_sources=SOURCES,
)
#: Settings of the collapse runs: 2 steps, the first 80 characters as the hidden gates' prompts.
COLLAPSE = dict(TINY_RUN, seeds=(0,), steps=2, prompts={lang: [t[:80]] for lang, t in TEXT.items()})


@pytest.fixture(scope="module")
def collapse_dir(tiny_models, tmp_path_factory):
    """Collapse runs: orthogonal and hidden gates x aux loss on/off in ``collapse/``, a
    parallel invocation (uniform_random) in ``other/``, longer runs in ``longer/``."""
    from study.collapse import run_collapse

    root = tmp_path_factory.mktemp("collapse")
    args = (tiny_models["base"], {"de": tiny_models["de"]})
    runs = [
        ("collapse", ("orthogonal", "hidden"), (0.01, 0.0), {}),
        ("other", ("uniform_random",), (0.01,), {}),
        ("longer", ("random",), (0.01,), {"steps": 3}),
    ]
    for name, modes, coefs, extra in runs:
        settings = {**COLLAPSE, **extra}
        run_collapse(*args, root / name, gate_modes=modes, aux_loss_coefs=coefs, **settings)
    return root


def read_collapse(root, name: str = "collapse") -> dict:
    return json.loads((root / name / "collapse.json").read_text())


def test_grid_rows_are_evaluated_and_resumed(grid):
    first, again = grid
    assert len(first["rows"]) == 2
    m = first["rows"][1]["metrics"]
    assert m["ppl_en"] > 0 and m["mean_anchor_share"] is not None and "own_share_de" in m
    assert set(first["references"]) == {"base", "de"}
    assert again["complete"]
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in first["rows"]]


def test_collapse_runs_log_balance_and_curves(collapse_dir):
    collapse = read_collapse(collapse_dir)
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


def test_collapse_runs_of_a_parallel_invocation_join_only_with_the_same_settings(collapse_dir):
    from study.collapse import combine_runs

    collapse = read_collapse(collapse_dir)
    both = combine_runs(collapse, [collapse_dir / "other" / "collapse.json"])
    assert [r["gate_mode"] for r in both["runs"]][-1] == "uniform_random"
    assert len(both["runs"]) == 5 and both["complete"]
    with pytest.raises(ValueError, match="other settings"):
        combine_runs(collapse, [collapse_dir / "longer" / "collapse.json"])


def test_report_of_grid_and_collapse(grid, collapse_dir, tmp_path):
    from study.collapse import combine_runs
    from study.report import write_report

    collapse = combine_runs(read_collapse(collapse_dir), [collapse_dir / "other" / "collapse.json"])
    doc = tmp_path / "study.md"
    write_report(grid[0], collapse, {}, doc, tmp_path / "img", timings={"grid": 1.0})
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


def test_train_expert_fine_tunes_the_mlp_and_resumes(tiny_models, debian_reference, tmp_path):
    from study.experts import ExpertSettings, expert_dir, is_built, train_expert

    debian_reference("de")
    settings = ExpertSettings(
        steps=3, batch_size=1, seq_len=16, max_train_tokens=400, eval_tokens=40, dtype="float32"
    )
    marker = train_expert("de", settings, base_dir=tiny_models["base"], root=tmp_path)
    assert len(marker["losses"]) == 3 and marker["first_loss"] == marker["losses"][0]
    config = json.loads((expert_dir("de", tmp_path) / "config.json").read_text())
    mlp = 3 * config["hidden_size"] * config["intermediate_size"]  # gate, up, down
    assert marker["trainable_parameters"] == config["num_hidden_layers"] * mlp  # MLP only
    assert is_built("de", settings, tmp_path)
    assert train_expert("de", settings, base_dir=tiny_models["base"], root=tmp_path) == marker


def test_trained_runs_merge_then_train_router_then_experts(tiny_models, tmp_path):
    from study.trained import POINTS, run_trained, trained_rows

    experts = {"de": tiny_models["de"]}
    rows = trained_rows([7], ["off", "u_shaped@0.8"])
    assert [(r["name"], r["params"]["seed"]) for r in rows] == [("off", 7), ("u_shaped@0.8", 7)]
    kwargs = dict(TINY_RUN, router_steps=2, experts_steps=3)
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


def test_balancing_runs_train_glm4_moe_per_mode_and_render_a_section(tiny_models, tmp_path):
    from study import balancing
    from study.trained import run_trained

    rows = balancing.balancing_rows([0], ["aux_loss", "bias"])
    assert [(r["name"], r["params"]["architecture"]) for r in rows] == [
        ("aux_loss", "glm4_moe"),
        ("bias", "glm4_moe"),
    ]
    kwargs = dict(TINY_RUN, router_steps=2, experts_steps=2, curve_every=1)
    # three experts, top-2: loads can differ (the same fine-tune twice is enough for that)
    experts = {"de": tiny_models["de"], "fr": tiny_models["de"]}
    result = run_trained(
        tiny_models["base"], experts, tmp_path, rows, summary="balancing.json", **kwargs
    )
    assert result["complete"] and (tmp_path / "balancing.json").exists()
    aux, bias = result["runs"]
    # held-out balance before and after every step of each stage
    assert [p["step"] for p in bias["curves"]["router"]] == [0, 1, 2]
    assert all(p["mean_max_violation"] is not None for p in bias["curves"]["experts"])
    # the router bias moves only under bias balancing; the aux loss only under aux_loss
    last = bias["histories"]["experts"][-1]
    assert last["bias_max"] > last["bias_min"]
    assert "bias_max" not in aux["histories"]["experts"][-1]
    assert all(h["loss"] == h["lm_loss"] for h in bias["histories"]["experts"])
    assert all(h["loss"] > h["lm_loss"] for h in aux["histories"]["experts"])
    doc = tmp_path / "study.md"
    doc.write_text("# Study\n\nintro\n")
    section = balancing.render(result, "img", "python -m study --parts balancing")
    for _ in range(2):  # written again, it replaces itself
        balancing.write_section(doc, section)
    text = doc.read_text()
    assert text.startswith("# Study\n\nintro\n") and text.count(balancing.BEGIN) == 1
    assert "| aux_loss | 1 |" in text and "| bias | 1 |" in text
    assert balancing.read_section(doc) == section
    # the compact record kept beside the document renders the same section
    kept = json.loads(json.dumps(balancing.compact(result)))
    assert balancing.render(kept, "img", "python -m study --parts balancing") == section
    doc.write_text(doc.read_text() + "\nNotes by hand.\n")
    tail = balancing.read_tail(doc)
    doc.write_text("# Study, rewritten\n")  # as the full report does
    balancing.append_tail(doc, tail)
    assert doc.read_text() == "# Study, rewritten\n\n" + section + "\nNotes by hand.\n"
    balancing.plot_curves(result, tmp_path / "balancing.png")
    assert (tmp_path / "balancing.png").stat().st_size > 0


#: Out-of-domain English for the replay runs: in no training mixture.
OOD_EN = "Permission is granted to copy and distribute verbatim copies of this license. " * 6


def test_replay_mixtures_weigh_new_languages_and_english():
    from study.forgetting import debian_mixture, forgetting_rows, replay_mixture

    new = {"de": {"text": "x"}, "fr": {"text": "y"}}
    assert replay_mixture(new, {"text": "e"}, 0.0) == {
        "de": {"text": "x", "weight": 0.5},
        "fr": {"text": "y", "weight": 0.5},
    }
    mix = replay_mixture(new, {"text": "e"}, 0.2)
    assert mix["en_replay"] == {"text": "e", "weight": 0.2} and mix["de"]["weight"] == 0.4
    assert sum(s["weight"] for s in mix.values()) == pytest.approx(1.0)
    mix = debian_mixture(["en", "de", "fr", "es"], 0.1)
    assert list(mix) == ["de", "fr", "es", "en_replay"]
    assert mix["es"] == {"debian_reference": "es", "split": "train", "weight": 0.3}
    assert mix["en_replay"] == {"debian_reference": "en", "split": "train", "weight": 0.1}
    with pytest.raises(ValueError, match="replay must be in"):
        replay_mixture(new, {"text": "e"}, 1.0)
    rows = forgetting_rows([3, 4], lambda r: {"r": r}, (0.0, 0.25), experts_lr=2e-4)
    assert [(r["name"], r["params"]["seed"]) for r in rows[:4]] == [
        ("moe replay0", 3),
        ("dense replay0", 3),
        ("moe replay25", 3),
        ("dense replay25", 3),
    ]
    moe, dense = rows[2], rows[3]
    assert moe["params"]["architecture"] == "glm4_moe" and moe["trainer"] == {"balancing": "bias"}
    assert dense["params"]["num_experts"] == 1 and dense["trainer"]["learning_rate"] == 2e-4
    assert moe["train_sources"] == dense["train_sources"] == {"r": 0.25}
    with pytest.raises(ValueError, match="Unknown models"):
        forgetting_rows([0], lambda r: {}, models=("moe", "moe2"))


def test_the_dense_baseline_is_the_dense_model_with_its_ffn_trained(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
    from fusion_bench_moect.inspection import decoder_layers, expert_triples, moe_block
    from study.common import make_pool
    from study.forgetting import forgetting_rows
    from study.trained import _train

    row = forgetting_rows([0], lambda r: dict(SOURCES), (0.0,), ("dense",), experts_lr=1e-2)[0]
    moe = OrthogonalMoECTMergingAlgorithm(**row["params"]).run(make_pool(tiny_models["base"], {}))
    dense = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)  # the dense function
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    settings = {
        "router_stage": {"steps": 2, "learning_rate": 5e-4},
        "experts_stage": {"steps": 2, "learning_rate": 1e-4},
        **{k: TINY_RUN[k] for k in ("batch_size", "seq_len")},
        "train_tokens_per_language": 200,
    }
    sources = {"train": row["train_sources"], "eval": SOURCES}
    # the router point trains the FFN too, at the row's (experts') learning rate
    trained, history, *_ = _train(moe, "router", row, tiny_models["base"], sources, settings)
    assert len(history) == 2
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(
        ".experts." in n for n in changed
    )  # FFN only; one router gets no gradient
    # written back into the dense architecture, the trained FFN gives the trained logits
    with torch.no_grad():
        for moe_layer, layer in zip(decoder_layers(trained), decoder_layers(dense), strict=True):
            ((gate, up, down),) = expert_triples(moe_block(moe_layer))
            for name, value in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                getattr(layer.mlp, name).weight.copy_(value)
        torch.testing.assert_close(dense(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)


def test_replay_runs_compare_moe_and_dense_and_render_a_section(tiny_models, tmp_path):
    from study import balancing, forgetting, sections
    from study.grid import row_path
    from study.runs import RunLog
    from study.trained import POINTS, run_trained

    def mixture(replay):
        return forgetting.replay_mixture({"de": SOURCES["de"]}, SOURCES["en"], replay)

    rows = forgetting.forgetting_rows([0], mixture, (0.0, 0.5))
    evals = {**SOURCES, "fr": SOURCES["de"], "en_gpl3": {"text": OOD_EN}}
    kwargs = dict(TINY_RUN, router_steps=2, experts_steps=2, curve_every=2, eval_sources=evals)
    experts = {"de": tiny_models["de"], "fr": tiny_models["de"]}
    args = (tiny_models["base"], experts, tmp_path, rows)
    result = run_trained(*args, summary="forgetting.json", **kwargs)
    assert result["complete"] and len(result["runs"]) == 4
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["moe replay50"]["train_sources"]["en_replay"]["weight"] == 0.5
    assert "en_replay" not in runs["dense replay0"]["train_sources"]
    # the trainer's weighted mixture: the share of every step each source got, in each stage
    for model in forgetting.MODELS:
        for stage in ("router", "experts"):
            half = runs[f"{model} replay50"]["data_plans"][stage]
            assert {k: v["share"] for k, v in half.items()} == {"de": 0.5, "en_replay": 0.5}
            alone = runs[f"{model} replay0"]["data_plans"][stage]
            assert {k: v["share"] for k, v in alone.items()} == {"de": 1.0}
    base = result["references"]["base"]["perplexity"]
    for name in ("dense replay0", "dense replay50"):
        points = runs[name]["points"]
        # before training the dense run is the base; training moves it
        assert points["merged"]["ppl_en_gpl3"] == pytest.approx(base["en_gpl3"], rel=1e-6)
        assert points["experts"]["ppl_de"] != points["merged"]["ppl_de"]
        assert points["experts"]["mean_anchor_share"] is None
        assert [p["step"] for p in runs[name]["curves"]["router"]] == [0, 2]
    moe = runs["moe replay0"]["points"]
    assert all(moe[p]["anchor_share_en"] is not None for p in POINTS)
    measured = forgetting.measures(moe["experts"], result["settings"]["languages"])
    assert measured["en_ood"] == pytest.approx(moe["experts"]["ppl_en_gpl3"] / base["en_gpl3"] - 1)
    new = [moe["experts"]["ppl_de"] / base["de"] - 1, moe["experts"]["ppl_fr"] / base["fr"] - 1]
    assert measured["plasticity"] == pytest.approx(sum(new) / 2)
    # a resumed run keeps the saved runs; a run saved with another mixture is not reused
    again = run_trained(*args, summary="forgetting.json", resume=True, **kwargs)
    assert [r["points"] for r in again["runs"]] == [r["points"] for r in result["runs"]]
    saved = row_path(tmp_path / "runs", rows[0])
    assert RunLog.finished(saved, train_sources=rows[0]["train_sources"]) is not None
    assert RunLog.finished(saved, train_sources=mixture(0.25)) is None
    section = forgetting.render(result, "img", "python -m study --parts forgetting")
    assert forgetting.verdict(result) in section
    assert "| moe | 0% | 1 |" in section and "| dense | 50% | 1 | " in section
    assert f"| dense base (before training) |  | {base['en']:.3f} |" in section
    kept = json.loads(json.dumps(forgetting.compact(result)))
    assert forgetting.render(kept, "img", "python -m study --parts forgetting") == section
    doc = tmp_path / "study.md"
    doc.write_text("# Study\n\n" + balancing.BEGIN + "\nb\n" + balancing.END + "\n\nNotes.\n")
    for _ in range(2):  # written again, it replaces itself
        forgetting.SECTION.write(doc, section)
    assert forgetting.SECTION.read(doc) == section
    tail = sections.read_tail(doc, (balancing.SECTION, forgetting.SECTION))
    assert tail.startswith(balancing.BEGIN) and tail.endswith(section)
    forgetting.plot(result, tmp_path / "forgetting.png")
    assert (tmp_path / "forgetting.png").stat().st_size > 0


def _replay_summary(ood: dict, new: dict) -> dict:
    """A forgetting summary whose runs end with the given out-of-domain English and de
    changes per (model, replay), one seed."""
    runs = [
        {
            "name": f"{model} replay{round(100 * replay)}",
            "model": model,
            "replay": replay,
            "points": {"experts": {"forgetting_en_gpl3": change, "de_vs_base": new[model, replay]}},
        }
        for (model, replay), change in ood.items()
    ]
    return {"settings": {"languages": ["en", "de"]}, "runs": runs}


def test_the_verdict_reads_the_replay_each_model_needs_and_its_cost():
    from study.forgetting import verdict

    ood = {("moe", 0.0): 0.05, ("moe", 0.1): 0.004, ("moe", 0.25): -0.01}
    ood |= {("dense", 0.0): 0.3, ("dense", 0.1): 0.2, ("dense", 0.25): 0.1}
    new = {key: -0.2 if key[0] == "moe" else -0.3 for key in ood}
    new["moe", 0.1] = -0.15
    text = verdict(_replay_summary(ood, new))
    assert "the MoE needs 10% replay to keep it (+5.0% at 0%, +0.4% at 10%)" in text
    assert "the dense fine-tune forgets it at every replay ratio tried (at best +10.0%)" in text
    assert text.endswith(
        "at 10% replay de perplexity moves MoE -15.0% (-20.0% at 0%), dense fine-tune -30.0% "
        "(-30.0% at 0%)."
    )
    ood["moe", 0.0] = 0.0
    assert "the MoE keeps it at 0% replay (+0.0%)" in verdict(_replay_summary(ood, new))


@pytest.mark.parametrize("generated", [True, False], ids=["generated-block", "new-document"])
def test_the_report_keeps_the_parts_sections_once(tmp_path, generated):
    from study import balancing, forgetting
    from study.cli import main
    from study.report import BEGIN, END

    parts = (
        f"{balancing.BEGIN}\nb\n{balancing.END}\n\nNotes.\n\n"
        f"{forgetting.SECTION.begin}\nf\n{forgetting.SECTION.end}\n"
    )
    doc = tmp_path / "study.md"
    doc.write_text(f"# Study\n\n{BEGIN}\nold\n{END}\n\n{parts}" if generated else parts)
    out = ["--out", str(tmp_path / "out"), "--doc", str(doc), "--img-dir", str(tmp_path / "img")]
    assert main(["--parts", "report", *out]) == 0
    text = doc.read_text()
    assert text.endswith(parts) and text.count(parts) == 1 and "\nold\n" not in text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--forgetting-replay", "0,1.5"], "replay must be in [0, 1)"),
        (["--forgetting-models", "moe,sparse"], "Unknown models ['sparse']"),
    ],
)
def test_bad_replay_options_stop_before_any_part(tmp_path, capsys, option, message):
    from study.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["--parts", "experts,forgetting", "--out", str(out), *option])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
