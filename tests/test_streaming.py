"""Streaming checkpoints (docs/benchmarks.md, "Memory model and the streaming mode"): the
engine's second sink writes the hub layout shard by shard; it must give exactly the model the
in-memory path gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BUILD_CASES, add_tokenizer, perturbed, pool, read_tensors, reload

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.io.sources import SourceError

# Version-sensitive (hub names and expert order against this major's models): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


def record_without_run_params(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    for name in ("save_checkpoint", "streaming"):
        config["moe_ct"]["params"].pop(name)
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("family, arch, dtype, extra", BUILD_CASES)
def test_streamed_checkpoint_equals_in_memory_model(
    tmp_path, saved, real_ids, family, arch, dtype, extra, tiny_model, tokenizer_dir
):
    dense = tiny_model(family, layers=3)
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    common = dict(architecture=arch, granularity=2, experts_per_token=2, dtype=dtype, **extra)

    mem_dir, stream_dir = tmp_path / "mem", tmp_path / "stream"
    algo = OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(mem_dir), **common)
    moe = algo.run(pool(models, tokenizer=str(tokenizer_dir)))
    streamed = OrthogonalMoECTMergingAlgorithm(
        save_checkpoint=str(stream_dir), streaming=True, **common
    ).run(pool(models, tokenizer=str(tokenizer_dir)))
    assert streamed is None

    # the same tensors under the same hub names, bit for bit
    mem, stream = read_tensors(mem_dir), read_tensors(stream_dir)
    assert sorted(mem) == sorted(stream)
    for key in mem:
        assert mem[key].dtype == stream[key].dtype, key
        assert torch.equal(mem[key], stream[key]), key
    # the same config and record (but for the run's own save/streaming parameters)
    assert record_without_run_params(mem_dir) == record_without_run_params(stream_dir)
    assert (stream_dir / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stream.")]

    # and it reloads into the model run() returned
    with torch.no_grad():
        expected = moe(real_ids).logits
        logits = reload(stream_dir)(real_ids).logits
    assert torch.equal(logits, expected)


def test_sharded_stream_reloads(tmp_path, saved, real_ids, monkeypatch, tiny_model):
    from fusion_bench_moect.io import streaming

    dense = tiny_model("llama", layers=3)
    base = saved(dense)
    out = tmp_path / "moe"
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=4, dtype="float32").run(
        pool({"_pretrained_": base})
    )
    # tiny shards: several files plus the index
    monkeypatch.setattr(streaming, "DEFAULT_MAX_SHARD_BYTES", 200_000)
    OrthogonalMoECTMergingAlgorithm(
        num_experts=4, dtype="float32", streaming=True, save_checkpoint=str(out)
    ).run(pool({"_pretrained_": base}))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in read_tensors(out).values()
    )
    with torch.no_grad():
        assert torch.equal(reload(out)(real_ids).logits, moe(real_ids).logits)


def test_streaming_needs_a_checkpoint_directory(saved, tmp_path, tiny_model):
    base = saved(tiny_model("llama"))
    with pytest.raises(ValueError, match="streaming: true .* needs save_checkpoint"):
        OrthogonalMoECTMergingAlgorithm(num_experts=2, streaming=True).run(
            pool({"_pretrained_": base})
        )


def test_a_failure_while_streaming_leaves_nothing(tmp_path, saved, tiny_model):
    dense = tiny_model("llama", layers=3)
    bad = perturbed(dense, 1)
    with torch.no_grad():
        bad.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")  # found in the last layer
    models = {"_pretrained_": saved(dense, "base"), "bad": saved(bad, "bad")}
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="'bad'.*layers.2.mlp.down_proj.*NaN"):
        OrthogonalMoECTMergingAlgorithm(streaming=True, save_checkpoint=str(out)).run(pool(models))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "base"]


@pytest.mark.parametrize(
    "family, arch, overrides",
    [
        ("llama", "mixtral", {}),
        ("llama", "mixtral", {"tie_word_embeddings": False}),
        ("mistral", "mixtral", {}),
        ("llama", "qwen2_moe", {}),
        ("qwen2", "qwen2_moe", {}),
        ("qwen3", "qwen3_moe", {}),
        ("qwen3", "qwen3_moe", {"attention_bias": True}),
        ("llama", "glm4_moe", {}),
        ("qwen2", "glm4_moe", {}),
        ("qwen3", "glm4_moe", {}),
    ],
)
def test_declared_hub_names_match_the_transformers_model(tiny_model, family, arch, overrides):
    """The streaming writer names tensors from the arch classes, without a model: those names
    must be exactly what the transformers model (either major) saves."""
    from accelerate import init_empty_weights

    from fusion_bench_moect import arch as arch_registry
    from fusion_bench_moect.inspection import is_moe_param

    out = arch_registry.ARCHITECTURES[arch]()
    base_config = tiny_model(family, layers=2, **overrides).config
    config = out.build_config(base_config, 4, 2, 32, torch.float32)
    with init_empty_weights(include_buffers=False):
        model = out.model_class()(config)
    tie = bool(config.tie_word_embeddings)
    params = {
        n
        for n, _ in model.named_parameters()
        if not is_moe_param(n) and not (tie and n == "lm_head.weight")
    }
    assert set(out.non_ffn_names(config)) == params


def test_writer_checks_the_plan_and_writes_valid_safetensors(tmp_path):
    from fusion_bench_moect.io.streaming import ShardedSafetensorsWriter

    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
        "d": torch.tensor(1.5, dtype=torch.float16),
        "e": torch.randn(4, 6)[:, ::2],  # non-contiguous
    }
    specs = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=60) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    loaded = read_tensors(tmp_path)
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
    assert len(writer.files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()

    other = tmp_path / "other"
    other.mkdir()
    writer = ShardedSafetensorsWriter(other, specs)
    with pytest.raises(RuntimeError, match="expected a \\[3, 5\\]"):
        writer.write("a", torch.zeros(5, 3, dtype=torch.bfloat16))
    writer = ShardedSafetensorsWriter(other, specs)
    writer.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="'b' was never written"):
        writer.close()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_writer_places_tensors_in_any_order(tmp_path, monkeypatch, direct):
    """Direct I/O (aligned blocks, edges held until complete) and the page cache, tensors in
    plan order or shuffled, small staging buffers: always the same bytes."""
    from fusion_bench_moect.io import filewriter
    from fusion_bench_moect.io.streaming import ShardedSafetensorsWriter

    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 1023, 4096, 4097, 9000, 20_000, 2, 12_289]
    tensors = {
        f"t{i}": torch.randn(n, generator=gen).to(torch.bfloat16) for i, n in enumerate(sizes)
    }
    tensors["f32"] = torch.randn(7, 301, generator=gen)
    specs = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    shuffled = [list(tensors)[i] for i in torch.randperm(len(tensors), generator=gen)]

    def write(folder: Path, order: list[str]) -> dict[str, bytes]:
        folder.mkdir()
        with ShardedSafetensorsWriter(folder, specs, max_shard_bytes=40_000) as writer:
            for key in order:
                writer.write(key, tensors[key])
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    monkeypatch.setenv(filewriter.DIRECT_IO_ENV, "0")
    reference = write(tmp_path / "plain", list(tensors))
    monkeypatch.setenv(filewriter.DIRECT_IO_ENV, direct)
    monkeypatch.setattr(filewriter, "STAGE_BYTES", 3 * filewriter.ALIGN)
    assert write(tmp_path / "shuffled", shuffled) == reference
    assert len(reference) > 3  # several shards and the index
    loaded = read_tensors(tmp_path / "shuffled")
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())

    writer = ShardedSafetensorsWriter(tmp_path / "shuffled", specs)
    writer.write("t0", tensors["t0"])
    with pytest.raises(RuntimeError, match="'t0' was written twice"):
        writer.write("t0", tensors["t0"])
    with pytest.raises(RuntimeError, match="'t1' was never written"):
        writer.close()


def test_lean_cli_writes_what_the_algorithm_streams(
    tmp_path, saved, real_ids, tiny_model, tokenizer_dir
):
    from fusion_bench_moect.cli.upcycle import main

    dense = tiny_model("qwen3", layers=2)
    base, ft = saved(dense, "base"), saved(perturbed(dense, 2), "ft")
    add_tokenizer(tokenizer_dir, base)
    cli_dir, algo_dir = tmp_path / "cli", tmp_path / "algo"
    assert (
        main(
            [base, str(cli_dir), "--source", f"ft={ft}", "--granularity", "2"]
            + ["--dtype", "bfloat16", "--drop-ratio", "0.5", "-q"]
        )
        == 0
    )
    OrthogonalMoECTMergingAlgorithm(
        granularity=2,
        dtype="bfloat16",
        drop_ratio=0.5,
        streaming=True,
        save_checkpoint=str(algo_dir),
    ).run(pool({"_pretrained_": base, "ft": ft}, tokenizer=base))
    cli, algo = read_tensors(cli_dir), read_tensors(algo_dir)
    assert sorted(cli) == sorted(algo)
    assert all(torch.equal(cli[k], algo[k]) for k in cli)
    assert record_without_run_params(cli_dir) == record_without_run_params(algo_dir)
    tokenizer = (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (cli_dir / "tokenizer.json").read_bytes() == tokenizer
    assert main([base, str(cli_dir), "-q"]) == 2  # refuses a non-empty directory


def test_lean_cli_imports_neither_fusion_bench_nor_modelling_code():
    code = (
        "import sys, fusion_bench_moect.cli.upcycle as u; "
        "u.build_parser(); import fusion_bench_moect.build; "
        "print(sorted(m for m in sys.modules if m.startswith(('fusion_bench.', 'lightning')) "
        "or m == 'fusion_bench' or '.modeling_' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
