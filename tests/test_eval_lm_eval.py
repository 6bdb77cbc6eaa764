"""lm-evaluation-harness through FusionBench (``MoELMEvalHarnessTaskPool``), offline, on the
shipped Debian Reference tasks: the upcycled MoE scores what the dense model scores, and the
numbers agree with our own ``MoETextTaskPool`` on the same text."""

from __future__ import annotations

import json
import math

import pytest
from helpers import REPO, fusion_bench, pool, report

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.data.text import load_debian_reference

#: Tokens per window: the tiny models' max_position_embeddings.
WINDOW = 128


@pytest.fixture(autouse=True)
def _needs_the_english_debian_reference(debian_reference):
    debian_reference("en")


def test_lm_eval_scores_the_moe_like_the_dense_model_and_like_our_taskpool(
    base_dir, tokenizer_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from fusion_bench_moect.eval.lm_eval_taskpool import MoELMEvalHarnessTaskPool
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

    dense = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=4, dtype="float32").run(
        pool({"_pretrained_": str(base_dir)})
    )
    task = "moect_debian_reference_en"
    scores = {}
    for name, model in (("dense", dense), ("moe", moe)):
        taskpool = MoELMEvalHarnessTaskPool(
            tasks=[task],
            limit=1,  # the first held-out chapter (4)
            tokenizer=str(tokenizer_dir),  # the in-memory MoE has no directory of its own
            max_length=WINDOW,
            batch_size=16,
            output_path=str(tmp_path / name),
        )
        result = taskpool.evaluate(model)
        assert result["n_samples"][task] == {"original": 3, "effective": 1}  # ch. 4, 8, 12
        saved = json.loads((tmp_path / name / "results.json").read_text())
        assert saved["results"] == result["results"]
        scores[name] = result["results"][task]
    dense_bpb, moe_bpb = scores["dense"]["bits_per_byte"], scores["moe"]["bits_per_byte"]
    assert 0 < dense_bpb < 16
    assert abs(moe_bpb - dense_bpb) < 1e-5 * dense_bpb  # function-preserving upcycling

    # the same text through our task pool (non-overlapping windows of the same length):
    # the same nats per byte, up to the first token of each window that it does not score
    chapter = load_debian_reference("en", "heldout")[0].text
    (tmp_path / "ch04.txt").write_text(chapter)
    ours = MoETextTaskPool(
        sources={"en": str(tmp_path / "ch04.txt")},
        max_tokens_per_source=None,
        window_length=WINDOW,
        batch_size=16,
        tokenizer=str(tokenizer_dir),
        reference_models=[],
        routing_stats=False,
        plots=False,
        show_progress=False,
    ).evaluate(dense)
    source = ours["sources"]["en"]
    our_bpb = source["mean_nll"] * source["scored_tokens"] / (len(chapter.encode()) * math.log(2))
    assert abs(our_bpb - dense_bpb) < 0.02 * dense_bpb


def test_fusion_bench_cli_runs_the_lm_eval_taskpool_on_an_upcycled_moe(
    base_dir, tokenizer_dir, tmp_path
):
    log_dir = tmp_path / "logs"
    fusion_bench(
        REPO,
        "method=moe_ct_upcycling",
        "method.num_experts=4",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={base_dir}",
        f"modelpool.tokenizer={tokenizer_dir}",
        "taskpool=moe_lm_eval",
        "taskpool.tasks=[moect_debian_reference_en]",
        "taskpool.limit=1",
        f"taskpool.max_length={WINDOW}",
        f"hydra.run.dir={log_dir}",
        f"path.log_dir={log_dir}",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    results = report(log_dir)["results"]["moect_debian_reference_en"]
    assert 0 < results["bits_per_byte"] < 16 and results["word_perplexity"] > 1
    assert (log_dir / "lm_eval_results" / "results.json").is_file()
