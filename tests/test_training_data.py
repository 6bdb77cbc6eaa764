"""Training data: sources streamed in chunks, packed windows, per-rank order, clear errors."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO, WORKER, local_train, real_text, run_fabric, run_local, training_params
from transformers import AutoTokenizer

from fusion_bench_moect.data import documents
from fusion_bench_moect.training.data import (
    TrainingDataError,
    iter_documents,
    load_windows,
    pack_source,
)
from fusion_bench_moect.training.sampler import WindowBatchSampler


def test_files_are_read_in_chunks_and_packed_with_eos(tokenizer_dir, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 97)  # many chunks, cut inside lines and characters
    text = real_text() + "\nCafé, naïve, 東京.\n"
    (tmp_path / "a.txt").write_text(text)
    windows = pack_source(tokenizer, str(tmp_path / "a.txt"), seq_len=16)
    assert windows.dtype == torch.int32 and windows.shape[1] == 16
    stream = tokenizer.decode(windows.flatten().tolist()).rstrip("\ufffd")  # cut mid-character
    assert (text + "<eos>").startswith(stream) and len(stream) > len(text) - 64


def test_folders_globs_gzip_and_jsonl(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text(real_text()[:1500])
    with gzip.open(tmp_path / "corpus" / "two.txt.gz", "wt") as handle:
        handle.write(real_text()[1500:3000])
    lines = [json.dumps({"body": p}) for p in real_text().split("\n\n") if p.strip()]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    names = [name for name, _ in iter_documents(str(tmp_path / "corpus"))]
    assert names == [str(tmp_path / "corpus" / "one.txt")]  # a folder gives its *.txt files
    names = [name for name, _ in iter_documents(str(tmp_path / "corpus" / "*"))]
    assert len(names) == 2
    docs = list(iter_documents({"jsonl": str(tmp_path / "docs.jsonl"), "field": "body"}))
    assert len(docs) == len(lines) and docs[0][0].endswith("docs.jsonl:1")
    windows, per_source = load_windows(
        tokenizer,
        {
            "files": str(tmp_path / "corpus" / "*"),
            "docs": {"jsonl": str(tmp_path / "docs.jsonl"), "field": "body"},
        },
        seq_len=32,
        max_tokens=None,
    )
    assert sum(per_source.values()) == len(windows) and min(per_source.values()) > 0
    # every document ends with EOS
    eos = tokenizer.eos_token_id
    assert int((windows == eos).sum()) >= len(lines) - 1


@pytest.mark.parametrize(
    "content, spec, match",
    [
        (b"", None, "is empty"),
        (b"caf\xe9 au lait\n" * 10, None, r"not UTF-8 text \(bad byte near offset 3\)"),
        (b'{"text": "fine"}\n{"txt": "no"}\n', "jsonl", r"line 2: no string field 'text'"),
        (b'{"text": "fine"}\nnot json\n', "jsonl", "line 2: not valid JSON"),
        (b"tiny", None, "fewer than one window"),
    ],
)
def test_bad_sources_give_clear_errors(tokenizer_dir, tmp_path, content, spec, match):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path / ("bad.jsonl" if spec else "bad.txt")
    path.write_bytes(content)
    with pytest.raises(TrainingDataError, match=match) as err:
        pack_source(tokenizer, str(path), seq_len=16, name="mine")
    assert "mine" in str(err.value) or str(path) in str(err.value)


def test_missing_path_and_malformed_mapping(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack_source(tokenizer, str(tmp_path / "nope.txt"), seq_len=16)
    with pytest.raises(TrainingDataError, match="exactly one of"):
        pack_source(tokenizer, {"text": "a", "path": "b"}, seq_len=16)
    with pytest.raises(TrainingDataError, match="needs train_sources"):
        load_windows(tokenizer, {}, seq_len=16, max_tokens=None)


def test_ranks_with_accumulation_see_the_same_micro_batches():
    """W ranks x A micro-batches use, step by step, the micro-batches of 1 rank x W*A."""
    one = WindowBatchSampler(50, 3, num_replicas=1, rank=0, seed=7)
    ranks = [WindowBatchSampler(50, 3, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 8 and len(single) == 16
        interleaved = [b for pair in zip(*per_rank, strict=True) for b in pair]
        assert interleaved == single
        flat = sorted(i for b in single for i in b)
        assert len(set(flat)) == len(flat) == 48
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # reshuffled per epoch
    full = list(one)
    one.set_epoch(1, skip=5)
    assert len(one) == 11 and list(one) == full[5:]  # resume mid-epoch


def _weighted(text: str) -> dict:
    """Two weighted sources of very different sizes: 30 % of a short one, 70 % of a long one."""
    return {
        "short": {"text": text[:300], "weight": 0.3},
        "long": {"text": text * 2, "weight": 0.7},
    }


def test_weighted_mixture_under_ddp_equals_one_process_with_accumulation(
    moe_checkpoint, tokenizer_dir, tmp_path
):
    moe_dir, _ = moe_checkpoint("qwen2_moe")
    sources = _weighted(real_text())
    ddp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "ddp", train_sources=sources)
    algo, single = run_local(
        moe_dir, str(tokenizer_dir), train_sources=sources, accumulate_grad_batches=2
    )
    worst = max((ddp["states"][0][k] - v).abs().max().item() for k, v in single.items())
    assert worst < 1e-5  # float sums in another order (all-reduce vs accumulation)
    for mine, theirs in zip(algo.history, ddp["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    plan = algo.data_plan
    assert plan["short"]["share"] == pytest.approx(0.3, abs=1e-3)
    assert plan["long"]["share"] == pytest.approx(0.7, abs=1e-3)


def test_resume_mid_mixture_is_exact_and_the_plan_is_recorded(
    moe_checkpoint, tokenizer_dir, tmp_path
):
    moe_dir, _ = moe_checkpoint("mixtral")
    settings = dict(
        train_sources=_weighted(real_text()), max_steps=5, accumulate_grad_batches=2,
        checkpoint_every=3, checkpoint_dir=str(tmp_path / "ckpts"),
    )  # fmt: skip
    full, expected = run_local(moe_dir, str(tokenizer_dir), **settings)
    step3 = tmp_path / "ckpts" / "step-000003"
    manifest = json.loads((step3 / "trainer_state.json").read_text())
    assert manifest["position"]["step"] == 3 and set(manifest["layout"]["data"]) == {
        "short",
        "long",
    }
    resumed, got = run_local(
        moe_dir, str(tokenizer_dir), **{**settings, "ckpt_path": str(step3), "checkpoint_every": 0}
    )
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert full.data_plan["short"]["epochs"] > 1 > full.data_plan["long"]["epochs"]
    saved = tmp_path / "saved"
    algo, model = local_train(moe_dir, str(tokenizer_dir), save_checkpoint=str(saved),
                              train_sources=settings["train_sources"])  # fmt: skip
    history = json.loads((saved / "training_history.json").read_text())
    assert history["data_plan"] == algo.data_plan == model.config.moe_ct_training["data_plan"]
    assert json.loads((saved / "config.json").read_text())["moe_ct_training"]["data_plan"] == (
        algo.data_plan
    )
    # the data plan is part of what a resumed run must share
    other = _weighted(real_text())
    other["short"]["weight"] = 0.5
    with pytest.raises(ValueError, match="another stage, strategy, global batch or data mixture"):
        run_local(moe_dir, str(tokenizer_dir), **{**settings, "train_sources": other,
                  "ckpt_path": str(step3), "checkpoint_every": 0})  # fmt: skip


def test_a_bad_source_under_ddp_stops_every_process_with_its_line(
    moe_checkpoint, tokenizer_dir, tmp_path
):
    """Local rank 0 builds the stores while rank 1 waits: its error reaches both, no hang."""
    moe_dir, _ = moe_checkpoint("qwen2_moe")
    (tmp_path / "empty.txt").write_text("")
    spec = {
        "moe_dir": moe_dir, "tokenizer": str(tokenizer_dir), "devices": 2, "strategy": "ddp",
        "params": training_params(train_sources={"bad": str(tmp_path / "empty.txt")}),
        "output": str(tmp_path / "out.pt"),
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "spec.json")], capture_output=True,
        text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (WORKER.parent, REPO)))},
    )  # fmt: skip
    assert out.returncode != 0
    stderr = re.sub(r"\s*\n(\[rank\d\]: )?", " ", out.stderr)  # the traceback's wrapping
    assert f"Training source 'bad': {tmp_path / 'empty.txt'} is empty" in stderr
    assert "The token stores could not be built (the error of local rank 0" in stderr
    assert not (tmp_path / "out.pt").exists()
