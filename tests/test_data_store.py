"""The token store (built once, keyed, memory-mapped, rebuilt when stale or corrupt), weighted
mixtures (exact shares, counted epochs, W x A == 1 x W*A, resumable by position) and the
tabular inputs (parquet, arrow, save_to_disk) with their one-line errors."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest
from helpers import real_text
from transformers import AutoTokenizer

from fusion_bench_moect.data.mixture import make_mixture
from fusion_bench_moect.data.store import (
    META,
    TOKENS,
    StoreCorruptError,
    describe_cap,
    ensure_store,
)
from fusion_bench_moect.training.data import (
    TrainingDataError,
    open_training_data,
    split_weights,
)
from fusion_bench_moect.training.sampler import MixtureBatchSampler


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_a_store_holds_every_token_and_is_built_once(tokenizer, tmp_path, monkeypatch):
    from fusion_bench_moect.data import store as store_module

    monkeypatch.setattr(store_module, "PIECE_CHARS", 300)  # many pieces, many batches
    monkeypatch.setattr(store_module, "BATCH_CHARS", 1000)
    text = real_text() + "\nCafé, naïve, 東京.\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text[::-1])
    store = ensure_store(tokenizer, str(tmp_path / "*.txt"), "mine", tmp_path / "cache")
    ids = store.tokens.tolist()
    eos = tokenizer.eos_token_id
    assert store.tokens.dtype == np.uint16 and ids.count(eos) == 2 and ids[-1] == eos
    first = ids[: ids.index(eos)]
    assert tokenizer.decode(first) == text  # every character, no cap
    assert store.meta["max_id"] == max(ids) and store.meta["read"]["documents"] == 2
    stamp = (store.path / META).stat().st_mtime_ns
    again = ensure_store(tokenizer, str(tmp_path / "*.txt"), "mine", tmp_path / "cache")
    assert again.path == store.path and (store.path / META).stat().st_mtime_ns == stamp
    same = ensure_store(tokenizer, {"path": str(tmp_path / "*.txt")}, "mine", tmp_path / "cache")
    assert same.path == store.path  # {path: X} is the source X: not tokenised again


def test_a_changed_source_or_tokenizer_gets_a_new_store(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(real_text())
    first = ensure_store(tokenizer, str(tmp_path / "a.txt"), "s", tmp_path / "cache")
    (tmp_path / "a.txt").write_text(real_text() + "\nOne more line.\n")
    second = ensure_store(tokenizer, str(tmp_path / "a.txt"), "s", tmp_path / "cache")
    assert second.path != first.path and len(second.tokens) > len(first.tokens)
    tokenizer.add_tokens(["<new-token>"])  # another tokenizer: another key
    third = ensure_store(tokenizer, str(tmp_path / "a.txt"), "s", tmp_path / "cache")
    assert third.path not in (first.path, second.path)


def test_a_launch_reads_the_whole_store_only_after_it_changed(tokenizer, tmp_path, monkeypatch):
    """The digest check reads every byte (about 1 s per 400 MB: 25 s a launch at 10 GB); once a
    store matched, later launches compare the file's state instead, and any write since, even
    one that puts the modification time back, makes the next launch read it again."""
    import os

    from fusion_bench_moect.data import store as store_module

    reads = []
    digest = store_module._digest
    monkeypatch.setattr(store_module, "_digest", lambda path: reads.append(path) or digest(path))
    spec = {"text": real_text()}
    built = ensure_store(tokenizer, spec, "s", tmp_path)  # its digest came from the bytes written
    path, expected = built.path, built.tokens.tolist()
    del built
    assert ensure_store(tokenizer, spec, "s", tmp_path).tokens.tolist() == expected
    assert reads == []
    tokens = path / TOKENS
    before = tokens.stat()
    raw = tokens.read_bytes()
    tokens.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    assert ensure_store(tokenizer, spec, "s", tmp_path).tokens.tolist() == expected  # rebuilt
    assert reads == [tokens]
    tokens.write_bytes(tokens.read_bytes())  # rewritten unchanged: read once, then trusted
    for _ in range(2):
        assert ensure_store(tokenizer, spec, "s", tmp_path).tokens.tolist() == expected
    assert reads == [tokens, tokens]


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_a_damaged_store_is_named_and_rebuilt(tokenizer, tmp_path, caplog, damage):
    spec = {"text": real_text()}
    store = ensure_store(tokenizer, spec, "s", tmp_path)
    expected = store.tokens.tolist()
    path = store.path
    del store
    raw = (path / TOKENS).read_bytes()
    if damage == "truncate":
        (path / TOKENS).write_bytes(raw[:-6])
    elif damage == "flip":
        (path / TOKENS).write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    else:
        (path / META).write_text("{")
    if damage != "flip":  # a waiting process checks sizes only; the builder, the digest too
        with pytest.raises(StoreCorruptError, match=rf"Token store {path}") as err:
            ensure_store(tokenizer, spec, "s", tmp_path, build=False)
        assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING):
        rebuilt = ensure_store(tokenizer, spec, "s", tmp_path)
    assert f"Token store {path}" in caplog.text and "Rebuilding" in caplog.text
    assert rebuilt.path == path and rebuilt.tokens.tolist() == expected


def test_a_cap_is_explicit_and_says_what_it_dropped(tokenizer, tmp_path, monkeypatch):
    from fusion_bench_moect.data import store as store_module

    monkeypatch.setattr(store_module, "BATCH_CHARS", 1000)  # the cap falls in the first batch
    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"{i}.txt").write_text(real_text())
    store = ensure_store(tokenizer, str(tmp_path / "docs"), "big", tmp_path / "c", max_tokens=100)
    assert len(store.tokens) == 100
    line = describe_cap("big", store.meta)
    assert "max_tokens_per_source=100: kept 100 tokens, dropped " in line
    assert " of the 1 documents read (the last in part perhaps) and 4 documents (" in line
    full = ensure_store(tokenizer, str(tmp_path / "docs"), "big", tmp_path / "c")
    assert describe_cap("big", full.meta) is None and full.meta["read"]["documents"] == 5


def test_mixture_shares_are_exact_and_small_sources_repeat_by_whole_epochs():
    windows = [7, 50, 100_000]
    mixture = make_mixture([0.4, 0.4, 0.2], windows, global_batch=8, seed=3)
    period = mixture.period
    assert period % 8 == 0 and sum(mixture.quota) == period
    for quota, weight in zip(mixture.quota, [0.4, 0.4, 0.2], strict=True):
        assert abs(quota / period - weight) <= 1 / period
    draws = [mixture.window(n) for n in range(3 * period)]
    small = [w for s, w in draws if s == 0]
    for epoch in range(len(small) // 7):  # each epoch of the small source: every window once
        assert sorted(small[epoch * 7 : (epoch + 1) * 7]) == list(range(7))
    large = [w for s, w in draws if s == 2]
    assert len(set(large)) == len(large)  # subsampled: no window twice within its epoch
    again = make_mixture([2, 2, 1], windows, global_batch=8, seed=3)  # weights are normalised
    assert [again.window(n) for n in range(3 * period)] == draws
    other = make_mixture([0.4, 0.4, 0.2], windows, global_batch=8, seed=4)
    assert [other.window(n) for n in range(period)] != draws[:period]
    with pytest.raises(ValueError, match="less than one window"):
        make_mixture([1.0, 1e-9], [10, 10], global_batch=8, seed=0)


def test_mixture_batches_of_w_processes_equal_one_process_and_resume_by_position():
    offsets = [0, 7, 57, 1057]
    mixture = make_mixture([0.5, 0.3, 0.2], [7, 50, 1000], global_batch=2 * 3 * 2, seed=1)
    batch, world, accumulate = 2, 3, 2
    single = MixtureBatchSampler(mixture, offsets, batch, 1, 0, world * accumulate)
    ranks = [MixtureBatchSampler(mixture, offsets, batch, world, r, accumulate) for r in range(3)]
    assert single.num_batches == ranks[0].num_batches * world
    for epoch in range(2):
        single.set_epoch(epoch)
        whole = list(single)
        for r, sampler in enumerate(ranks):
            sampler.set_epoch(epoch)
            assert list(sampler) == whole[r::world]  # micro-batch k of rank r == k * W + r
    ranks[1].set_epoch(1)
    full = list(ranks[1])
    ranks[1].set_epoch(1, skip=4)
    assert list(ranks[1]) == full[4:]


def test_weights_all_or_none_and_positive():
    specs, weights = split_weights(
        {"a": {"text": "x", "weight": 3}, "b": {"text": "y", "weight": 1}}
    )
    assert specs == {"a": {"text": "x"}, "b": {"text": "y"}} and weights == {"a": 3.0, "b": 1.0}
    assert split_weights({"a": "x.txt"}) == ({"a": "x.txt"}, None)
    with pytest.raises(TrainingDataError, match=r"\['b'\] have no weight"):
        split_weights({"a": {"text": "x", "weight": 1}, "b": {"text": "y"}})
    with pytest.raises(TrainingDataError, match="'a': weight must be a positive number"):
        split_weights({"a": {"text": "x", "weight": 0}})


def _rows():
    return [p for p in real_text().split("\n\n") if p.strip()]


def test_parquet_arrow_and_save_to_disk_sources(tokenizer, tmp_path):
    rows = _rows()
    table = datasets.Dataset.from_dict({"body": rows, "n": list(range(len(rows)))})
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    sources = {
        "pq": {"parquet": str(tmp_path / "t.parquet"), "field": "body"},
        "ar": {"arrow": str(arrow), "field": "body"},
        "disk": {"dataset": str(tmp_path / "saved"), "field": "body"},
        "lit": {"text": "\n".join(f"{r}<|endoftext|>" for r in rows)},
    }
    data = open_training_data(tokenizer, sources, seq_len=16, cache_dir=str(tmp_path / "c"))
    streams = {n: s.tokens.tolist() for n, s in data.stores.items()}
    eos = tokenizer.eos_token_id
    assert streams["pq"] == streams["ar"] == streams["disk"]
    assert streams["pq"].count(eos) == len(rows)  # one document per row
    assert tokenizer.decode(streams["pq"][: streams["pq"].index(eos)]) == rows[0]


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"parquet": "{dir}/t.parquet"}, r"t.parquet has no column 'text' \(columns: body, n\)"),
        ({"parquet": "{dir}/t.parquet", "field": "n"}, "column 'n' holds int64, not text"),
        ({"dataset": "{dir}/saved", "field": "body", "split": "test"}, "has no rows"),
        ({"dataset": "{dir}/dict", "split": "dev"}, r"has no split 'dev' \(splits: train\)"),
        ({"dataset": "no-such/dataset-here"}, "neither a save_to_disk folder nor in the local"),
    ],
)
def test_bad_tabular_sources_fail_in_one_line(tokenizer, tmp_path, spec, match):
    table = datasets.Dataset.from_dict({"body": ["some text"], "n": [1]})
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.filter(lambda r: False).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    spec = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(TrainingDataError, match=match) as err:
        open_training_data(tokenizer, {"s": spec}, seq_len=4, cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else True


def test_plan_of_a_weighted_run(tokenizer, tmp_path):
    sources = {
        "small": {"text": real_text()[:2000], "weight": 0.5},
        "big": {"text": real_text() * 3, "weight": 0.5},
    }
    data = open_training_data(tokenizer, sources, seq_len=16, cache_dir=str(tmp_path))
    mixture = data.mixture(global_batch=4, seed=0)
    plan = data.plan(mixture, global_batch=4, total=100)
    assert plan["small"]["share"] == pytest.approx(0.5) and plan["small"]["weight"] == 0.5
    assert plan["small"]["epochs"] == pytest.approx(200 / plan["small"]["windows"], rel=1e-3)
    assert plan["big"]["epochs"] < plan["small"]["epochs"]
    json.dumps(plan)  # goes into the model's config and the step checkpoints
