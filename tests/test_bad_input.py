"""docs/algorithm.md, "Bad input": every bad input gets a clear error naming the culprit, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, perturbed, pool, train_tokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm


@pytest.fixture
def base_dir(saved):
    return saved(make_model("llama"), "base")


def assert_nothing_written(tmp_path: Path, allowed: set[str]):
    leftovers = {p.name for p in tmp_path.iterdir()} - allowed
    assert not leftovers, f"left behind: {leftovers}"


def run_expecting(tmp_path, models, message, exc=ValueError, tokenizer=None, **params):
    allowed = {p.name for p in tmp_path.iterdir()}
    algo = OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(tmp_path / "out"), **params)
    with pytest.raises(exc, match=message):
        algo.run(pool(models, tokenizer=tokenizer))
    assert_nothing_written(tmp_path, allowed)


def test_no_pretrained_entry(tmp_path, base_dir):
    run_expecting(tmp_path, {"de": base_dir}, "no '_pretrained_' entry: add `_pretrained_:")


def test_unsupported_base_architecture(tmp_path, saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    run_expecting(
        tmp_path,
        {"_pretrained_": saved(gpt2, "gpt2")},
        "Unsupported base architecture 'gpt2'; supported dense bases: llama, mistral, qwen2, qwen3",
    )


def test_unknown_output_architecture(tmp_path, base_dir):
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        "Unknown architecture 'deepseek'; valid: auto, mixtral, qwen2_moe, qwen3_moe",
        architecture="deepseek",
    )


def test_qwen3_base_into_mixtral_names_the_architecture_that_fits(tmp_path, saved):
    run_expecting(
        tmp_path,
        {"_pretrained_": saved(make_model("qwen3"), "qwen3")},
        r"cannot represent base tensor 'model.layers.0.self_attn.[qk]_norm.weight' .* use architecture: qwen3_moe",
        architecture="mixtral",
    )


def test_qwen2_base_with_biases_into_mixtral(tmp_path, saved):
    run_expecting(
        tmp_path,
        {"_pretrained_": saved(make_model("qwen2"), "qwen2")},
        "cannot represent base tensor '.*bias'.*use architecture: qwen2_moe",
        architecture="mixtral",
    )


def test_source_of_another_architecture(tmp_path, base_dir, saved):
    other = saved(make_model("mistral"), "mistral")
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir, "odd": other},
        "Source 'odd' is a mistral model but the base is llama",
    )


def test_source_with_other_layer_count(tmp_path, base_dir, saved):
    other = saved(make_model("llama", layers=3), "deep")
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir, "deep": other},
        "Source 'deep' has 3 layers, the base has 2",
    )


def test_source_with_other_tensor_shape(tmp_path, base_dir, saved):
    other = saved(make_model("llama", intermediate_size=32), "narrow")
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir, "narrow": other},
        r"Source 'narrow': tensor 'model.layers.0.mlp.down_proj.weight' has shape \[72, 32\], the base has \[72, 64\]",
    )


@pytest.mark.parametrize("where", ["base", "source"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_tensor(tmp_path, saved, where, bad):
    dense = make_model("llama")
    broken = perturbed(dense, 1)
    victim = dense if where == "base" else broken
    with torch.no_grad():
        victim.model.layers[1].mlp.up_proj.weight[3, 4] = bad
    models = {"_pretrained_": saved(dense, "b"), "ft": saved(broken, "s")}
    name = "_pretrained_" if where == "base" else "ft"
    run_expecting(
        tmp_path,
        models,
        f"Model '{name}': tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf",
    )


def test_tokenizers_with_different_vocabularies(tmp_path, saved):
    dense = make_model("llama")
    base = saved(dense, "b")
    src = saved(perturbed(dense, 1), "s")
    train_tokenizer(Path(base))
    train_tokenizer(Path(src), vocab_size=300, extra=" zebra quokka " * 50)
    run_expecting(
        tmp_path,
        {"_pretrained_": base, "s": src},
        "Source 's' has a tokenizer whose vocabulary differs from the base",
        tokenizer=base,
    )


@pytest.mark.parametrize("k", [0, 3])
def test_top_k_out_of_range(tmp_path, base_dir, k):
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        rf"experts_per_token={k} must lie in \[1, num_experts=2\]",
        num_experts=2,
        experts_per_token=k,
    )


def test_more_orthogonal_rows_than_hidden_size(tmp_path, base_dir):
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        "gate_mode 'orthogonal' needs at most hidden_size=72 distinct router rows but the plan has 73",
        num_experts=73,
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"base_alpha": 1.2}, r"base_alpha must lie in \[0, 1\], got 1.2"),
        (
            {"alpha_strategy": "cosine"},
            "Unknown alpha_strategy 'cosine'; valid: constant, linear_increase",
        ),
        ({"alpha_strategy": [0.1, 0.2, 0.3]}, "list of 3 values but the base model has 2 layers"),
        ({"alpha_strategy": [0.1, -0.2]}, "layer 1 has -0.2"),
        (
            {"gate_mode": "learned"},
            "Unknown gate_mode 'learned'; valid: orthogonal, random, uniform_random, hidden, cheap_embed",
        ),
        ({"granularity": 5}, "intermediate size 64 is not divisible by granularity 5"),
        (
            {"num_experts": 3},
            "num_experts=3 but the pool gives 1 source experts \\+ the base expert",
        ),
        ({"dtype": "float8"}, "Unknown dtype 'float8'"),
        (
            {"anchor_experts": ["nobody"]},
            "anchor_experts names \\['nobody'\\] that are not experts",
        ),
    ],
)
def test_bad_parameters(tmp_path, saved, params, message):
    dense = make_model("llama")
    models = {"_pretrained_": saved(dense, "b"), "ft": saved(perturbed(dense, 1), "s")}
    run_expecting(tmp_path, models, message, **params)


def test_num_experts_not_a_multiple_of_granularity(tmp_path, base_dir):
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        "num_experts=6 is not a multiple of granularity 4",
        granularity=4,
        num_experts=6,
    )


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_prompt_gates_without_prompts_or_tokenizer(tmp_path, base_dir, mode):
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        f"gate_mode '{mode}' needs prompts",
        gate_mode=mode,
        num_experts=2,
    )
    prompts = {"expert_0": ["GNU"], "expert_1": ["software"]}
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        f"gate_mode '{mode}' needs a tokenizer",
        gate_mode=mode,
        num_experts=2,
        prompts=prompts,
    )
    train_tokenizer(tmp_path / "tok")
    run_expecting(
        tmp_path,
        {"_pretrained_": base_dir},
        f"gate_mode '{mode}': expert 'expert_1' has no prompts",
        tokenizer=str(tmp_path / "tok"),
        gate_mode=mode,
        num_experts=2,
        prompts={"expert_0": ["GNU"]},
    )


def test_unwritable_save_directory(tmp_path, base_dir):
    (tmp_path / "plain_file").write_text("x")
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, save_checkpoint=str(tmp_path / "plain_file" / "out")
    )
    with pytest.raises(NotADirectoryError, match="cannot write in .*plain_file: it is a file"):
        algo.run(pool({"_pretrained_": base_dir}))
    assert (tmp_path / "plain_file").read_text() == "x"


def test_save_path_that_is_a_file(tmp_path, base_dir):
    (tmp_path / "out").write_text("x")
    algo = OrthogonalMoECTMergingAlgorithm(num_experts=2, save_checkpoint=str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        algo.run(pool({"_pretrained_": base_dir}))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(tmp_path, saved, damage):
    dense = make_model("llama")
    src = Path(saved(perturbed(dense, 1), "s"))
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07garbage" * 20)
    run_expecting(
        tmp_path,
        {"_pretrained_": saved(dense, "b"), "s": str(src)},
        "Model 's': cannot open .*model.safetensors .*truncated or corrupt",
    )
