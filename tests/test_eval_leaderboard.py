"""Leaderboard: grid expansion, ranking, the written files, and a real fusion_bench grid."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import REPO, real_text

from fusion_bench_moect.eval import leaderboard
from fusion_bench_moect.eval.leaderboard import (
    Row,
    build_rows,
    get_metric,
    rank_rows,
    split_values,
)


def test_split_values_respects_brackets():
    assert split_values("a,b") == ["a", "b"]
    assert split_values("u_shaped,[0.1,0.2],{a: 1, b: 2}") == [
        "u_shaped",
        "[0.1,0.2]",
        "{a: 1, b: 2}",
    ]
    with pytest.raises(ValueError, match="Empty value"):
        split_values("a,,b")


def test_build_rows_grid_fixed_and_baseline():
    rows = build_rows(
        "moe_ct_upcycling",
        ["gate_mode=orthogonal,random", "alpha_strategy=constant,u_shaped"],
        ["num_experts=4", "taskpool.max_tokens_per_source=64"],
        baseline=True,
    )
    assert [r.name for r in rows] == [
        "dense baseline (_pretrained_)",
        "gate_mode=orthogonal alpha_strategy=constant",
        "gate_mode=orthogonal alpha_strategy=u_shaped",
        "gate_mode=random alpha_strategy=constant",
        "gate_mode=random alpha_strategy=u_shaped",
    ]
    assert rows[0].method == "dummy" and rows[0].baseline
    assert rows[0].overrides == ["taskpool.max_tokens_per_source=64"]  # no method.* for dummy
    assert rows[4].overrides == [
        "method.num_experts=4",
        "taskpool.max_tokens_per_source=64",
        "method.gate_mode=random",
        "method.alpha_strategy=u_shaped",
    ]
    assert rows[4].settings == {"method.gate_mode": "random", "method.alpha_strategy": "u_shaped"}
    assert [r.name for r in build_rows("m", [])] == ["m"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_rows("m", ["gate_mode"])


def fake_row(name, ppl, maxvio=None, baseline=False):
    report = {"perplexity": {"en": ppl, "de": ppl + 1}, "overall_perplexity": ppl + 0.5}
    if maxvio is not None:
        report["routing"] = {"overall": {"mean_max_violation": maxvio, "mean_cv": maxvio / 2}}
    row = Row(
        name=name, settings={"method.gate_mode": name}, overrides=[], method="m", baseline=baseline
    )
    row.report, row.status, row.seconds = report, "ok", 1.25
    return row


def test_metric_lookup_and_ranking():
    report = {"a": {"b": [1, {"c": 3.5}]}, "p": {"en": 2.0}}
    assert get_metric(report, "a.b.1.c") == 3.5
    assert get_metric(report, "p.en") == 2.0
    assert get_metric(report, "p.fr") is None and get_metric(None, "x") is None
    rows = [
        fake_row("x", 10.0, 0.9),
        fake_row("y", 9.0, 0.1),
        fake_row("dense", 9.5, baseline=True),
    ]
    failed = Row(name="broken", settings={}, overrides=[], method="m", status="failed")
    ranked = rank_rows([failed, *rows], "perplexity.en")
    assert [r.name for r in ranked] == ["y", "dense", "x", "broken"]
    ranked = rank_rows(rows, "routing.overall.mean_max_violation")
    assert [r.name for r in ranked] == ["y", "x", "dense"]  # no routing: last
    assert [r.name for r in rank_rows(rows, "perplexity.en", higher_is_better=True)] == [
        "x",
        "dense",
        "y",
    ]


def test_written_files(tmp_path):
    rows = rank_rows(
        [fake_row("x", 10.0, 0.9), fake_row("y", 9.0, 0.1), fake_row("dense", 9.5, baseline=True)],
        "routing.overall.mean_max_violation",
    )
    files = leaderboard.write_outputs(
        rows,
        tmp_path,
        metric="routing.overall.mean_max_violation",
        higher_is_better=False,
        command="python -m fusion_bench_moect.cli.leaderboard --grid gate_mode=x,y",
        modelpool="pool",
        taskpool="tasks",
        title="Test board",
    )
    with open(files["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert [r["row"] for r in table] == ["y", "x", "dense"]
    assert [r["rank"] for r in table] == ["1", "2", ""]  # the baseline has no routing metric
    assert table[0]["MaxVio"] == "0.1000" and table[0]["ppl en"] == "9.0000"
    assert table[0]["ppl (all) / dense"] == f"{9.5 / 10.0:.5f}"
    markdown = files["md"].read_text()
    assert markdown.startswith("# Test board")
    assert "| 1 | y | y | 0.1000 |" in markdown
    assert "python -m fusion_bench_moect.cli.leaderboard --grid gate_mode=x,y" in markdown
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(files["json"].read_text())
    assert data["rows"][0]["metrics"]["routing.overall.mean_max_violation"] == 0.1


def test_real_fusion_bench_grid(tmp_path, monkeypatch, base_dir, tokenizer_dir):
    """Three real `fusion_bench` CLI runs on a tiny Llama: dense baseline + two gate modes."""
    text = tmp_path / "text.txt"
    text.write_text(real_text())
    monkeypatch.chdir(REPO)
    ranked, files = leaderboard.run_leaderboard(
        modelpool="smollm2_upcycle",
        taskpool="moe_text_gpl3",
        out=tmp_path / "board",
        grid=["gate_mode=orthogonal,random"],
        fixed=[
            f"modelpool.models._pretrained_={base_dir}",
            f"modelpool.tokenizer={tokenizer_dir}",
            "modelpool.model_kwargs.dtype=float32",
            "num_experts=4",
            f"taskpool.sources.gpl3='{text}'",
            "taskpool.max_tokens_per_source=128",
            "taskpool.window_length=64",
            "taskpool.show_progress=false",
        ],
        baseline=True,
        metric="routing.overall.mean_max_violation",
        command="(test)",
    )
    assert [r.status for r in ranked] == ["ok", "ok", "ok"], [r.error for r in ranked]
    by_name = {r.name: r for r in ranked}
    dense = by_name["dense baseline (_pretrained_)"].report
    assert dense["model"]["is_moe"] is False
    for name in ("gate_mode=orthogonal", "gate_mode=random"):
        report = by_name[name].report
        assert report["model"]["num_experts"] == 4
        # Pure upcycling preserves the dense model: identical perplexity in float32.
        assert report["perplexity"]["gpl3"] == pytest.approx(dense["perplexity"]["gpl3"], rel=1e-5)
        assert (by_name[name].run_dir / "program_report.json").is_file()
        assert (by_name[name].run_dir / "expert_load.png").is_file()
    orthogonal = by_name["gate_mode=orthogonal"].report["routing"]["overall"]
    assert orthogonal["max_condition_number"] == pytest.approx(1.0, abs=1e-3)
    assert ranked[-1].baseline  # no routing metric: ranked last
    assert {"md", "csv", "png", "json"} <= set(files)
