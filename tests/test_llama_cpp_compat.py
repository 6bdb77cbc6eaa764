"""What llama.cpp needs from our outputs (issue 11): an explicit output matrix and a nonzero
shared-expert gate for Qwen2-MoE, and warnings for what it cannot run as transformers does.

The end-to-end check (llama.cpp's own converter and ``llama-perplexity``) is
``benchmarks/interop.py``; these tests pin the properties it relies on."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import perturbed, pool, read_tensors

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.arch import ARCHITECTURES
from fusion_bench_moect.arch.qwen2_moe import initial_shared_gate

# Version-sensitive (what llama.cpp reads from our checkpoints (gguf)): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version


def ggml_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's qwen2moe shared-expert gate: silu(x) / x (ggml_div(ggml_silu(x), x))."""
    return (x / (1 + torch.exp(-x))) / x


@pytest.mark.parametrize("streaming", [False, True])
def test_qwen2_moe_from_a_tied_base_writes_an_explicit_lm_head(
    tmp_path, saved, real_ids, streaming, tiny_model
):
    dense = tiny_model("llama")  # tied embeddings, like every small Qwen2 / SmolLM2
    out = tmp_path / "moe"
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=4,
        architecture="qwen2_moe",
        dtype="float32",
        save_checkpoint=str(out),
        streaming=streaming,
    )
    moe = algo.run(pool({"_pretrained_": saved(dense)}))
    tensors = read_tensors(out)
    embedding = dense.model.embed_tokens.weight
    assert torch.equal(tensors["lm_head.weight"], embedding)
    assert torch.equal(tensors["model.embed_tokens.weight"], embedding)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings is False
    with torch.no_grad():
        expected = dense(real_ids).logits
        assert (reloaded(real_ids).logits - expected).abs().max().item() < 1e-5
    if not streaming:
        assert moe.config.tie_word_embeddings is False
        # its own memory: training the head must not move the embedding
        assert moe.lm_head.weight.data_ptr() != moe.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            assert (moe(real_ids).logits - expected).abs().max().item() < 1e-5


def test_other_families_keep_tied_embeddings(saved, tiny_model):
    dense = tiny_model("llama")
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=4, dtype="float32").run(
        pool({"_pretrained_": saved(dense)})
    )
    assert moe.config.model_type == "mixtral" and moe.config.tie_word_embeddings is True


def test_shared_gate_is_one_half_in_transformers_and_finite_in_llama_cpp(saved, tiny_model):
    dense = tiny_model("llama")
    moe = OrthogonalMoECTMergingAlgorithm(
        num_experts=4, architecture="qwen2_moe", dtype="float32"
    ).run(pool({"_pretrained_": saved(dense)}))
    hidden = {}
    mlp = moe.model.layers[1].mlp
    handle = mlp.register_forward_pre_hook(lambda _, args: hidden.setdefault("x", args[0]))
    ids = torch.arange(200).view(2, 100) % 256
    with torch.no_grad():
        moe(ids)
    handle.remove()
    gate = mlp.shared_expert_gate.weight
    assert bool((gate != 0).all())
    with torch.no_grad():
        logits = hidden["x"] @ gate.T
    assert bool((logits != 0).all())
    assert bool((torch.sigmoid(logits) == 0.5).all())  # exactly the zero-gate model
    assert bool((ggml_sigmoid(logits) == 0.5).all())  # and no 0 / 0 in llama.cpp
    assert bool(ggml_sigmoid(torch.zeros(1)).isnan().all())  # what a zero gate gave


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_initial_shared_gate_never_underflows(dtype):
    gate = initial_shared_gate(16, dtype)
    assert gate.dtype == dtype and bool((gate > 0).all())
    x = gate.float() @ torch.full((16, 1), 4.0)  # a typical post-norm hidden state
    assert torch.sigmoid(x.to(dtype)).item() == 0.5


def llama_cpp_notes(family: str, *args) -> list[str]:
    return ARCHITECTURES[family]().llama_cpp_notes(*args)


def test_llama_cpp_notes():
    assert llama_cpp_notes("mixtral", 8, 2, 0.5) == []
    assert llama_cpp_notes("qwen3_moe", 128, 8, 0.5) == []
    (note,) = llama_cpp_notes("mixtral", 6, 2, 0.5)
    assert "num_experts=6 is not a power of two" in note and "use 4 or 8" in note
    assert "5213" in note
    (note,) = llama_cpp_notes("qwen2_moe", 8, 2, 0.5)
    assert "ignores norm_topk_prob" in note and "experts_per_token=num_experts (8)" in note
    assert llama_cpp_notes("qwen2_moe", 8, 8, 0.5) == []  # all experts: weights sum to 1
    assert llama_cpp_notes("qwen2_moe", 8, 2, 1.0) == []  # routed experts contribute 0
    assert len(llama_cpp_notes("qwen2_moe", 12, 2, 0.5)) == 2


def test_llama_cpp_notes_are_in_the_plan_summary_not_warnings(saved, caplog, tiny_model):
    """A default merge of 2 sources has 3 experts (not a power of two): nothing is wrong with
    the model, so no WARNING; the advice is one INFO line of the plan summary."""
    dense = tiny_model("llama")
    models = {
        "_pretrained_": saved(dense),
        "a": saved(perturbed(dense, 1)),
        "b": saved(perturbed(dense, 2)),
    }
    with caplog.at_level(logging.INFO):
        OrthogonalMoECTMergingAlgorithm(dtype="float32").run(pool(models))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if "llama.cpp" in r.getMessage()]
    assert len(infos) == 1 and "num_experts=3 is not a power of two" in infos[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        OrthogonalMoECTMergingAlgorithm(
            num_experts=6, architecture="qwen2_moe", dtype="float32"
        ).run(pool({"_pretrained_": models["_pretrained_"]}))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    texts = [r.getMessage() for r in caplog.records]
    assert sum("not a power of two" in t for t in texts) == 1
    assert sum("ignores norm_topk_prob" in t for t in texts) == 1
