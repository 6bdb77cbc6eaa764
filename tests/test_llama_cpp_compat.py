"""What llama.cpp needs from our outputs (issue 11): an explicit output matrix and a nonzero
shared-expert gate for Qwen2-MoE, and warnings for what it cannot run as transformers does.

The end-to-end check (llama.cpp's own converter and ``llama-perplexity``) is
``benchmarks/interop.py``; these tests pin the properties it relies on."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader
from helpers import REPO, perturbed, pool, read_tensors

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.arch import ARCHITECTURES
from fusion_bench_moect.arch.qwen2_moe import initial_shared_gate
from fusion_bench_moect.cli import convert_gguf

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


# -- GGUF through llama.cpp's own converter (no C++ build: benchmarks/interop.py runs that) --

SMOLLM2_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def converter_python(other_python) -> str:
    """The interpreter llama.cpp's converter runs under: transformers 4.57, which it pins."""
    return sys.executable if transformers.__version__.startswith("4.") else other_python


def with_smollm2_tokenizer(directory: Path, smollm2_dir: Path) -> Path:
    """SmolLM2's tokenizer files beside a model: a vocabulary llama.cpp's converter knows."""
    for name in SMOLLM2_TOKENIZER:
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, directory / name)
    return directory


def convert(python: str, llama_cpp: Path, model: Path, out: Path, ours: bool, *extra: str):
    """llama.cpp's converter on ``model`` to an f32 GGUF (``ours``: through cli.convert_gguf)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if ours:
        cmd = ["-m", "fusion_bench_moect.cli.convert_gguf", str(model), str(out)]
        cmd += ["--outtype", "f32", "--llama-cpp", str(llama_cpp), *extra]
    else:
        cmd = [str(llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out)]
        cmd += ["--outtype", "f32"]
    return subprocess.run([python, *cmd], capture_output=True, text=True, env=env, cwd=REPO)


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A GGUF's metadata (key -> value) and tensors (name -> array, in torch's axis order)."""
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: np.asarray(t.data) for t in reader.tensors}


def test_only_a_tokenizer_with_all_glm_tokens_keeps_glm_vocabulary():
    glm = {token: 151329 + i for i, token in enumerate(convert_gguf.GLM_SPECIAL_TOKENS)}
    assert convert_gguf.uses_glm_vocabulary(glm)
    for token in glm:
        assert not convert_gguf.uses_glm_vocabulary({k: v for k, v in glm.items() if k != token})
    assert not convert_gguf.uses_glm_vocabulary({"<|im_start|>": 1, "<|endoftext|>": 0})


def test_glm4_moe_of_a_llama_base_converts_with_the_base_vocabulary(
    tmp_path, saved, tiny_model, smollm2_dir, llama_cpp_tree, converter_python
):
    """llama.cpp's converter fails on a GLM4-MoE of a SmolLM2-like base (it wants GLM's
    special tokens); through ``moect-convert-gguf`` the GGUF carries exactly the dense
    conversion's vocabulary and our tensors."""
    dense = with_smollm2_tokenizer(Path(saved(tiny_model("llama", vocab_size=49152))), smollm2_dir)
    moe = tmp_path / "glm"
    OrthogonalMoECTMergingAlgorithm(
        architecture="glm4_moe",
        num_experts=4,
        n_group=2,
        topk_group=1,
        dtype="float32",
        save_checkpoint=str(moe),
    ).run(pool({"_pretrained_": str(dense)}))
    with_smollm2_tokenizer(moe, smollm2_dir)

    plain = convert(converter_python, llama_cpp_tree, moe, tmp_path / "plain.gguf", ours=False)
    assert plain.returncode != 0 and "KeyError: '[gMASK]'" in plain.stderr
    for model, name, ours in ((dense, "dense.gguf", False), (moe, "moe.gguf", True)):
        done = convert(converter_python, llama_cpp_tree, model, tmp_path / name, ours)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["dense.gguf", "moe.gguf"]

    dense_fields, _ = read_gguf(tmp_path / "dense.gguf")
    fields, tensors = read_gguf(tmp_path / "moe.gguf")
    vocabulary = {k: v for k, v in dense_fields.items() if k.startswith("tokenizer.")}
    assert vocabulary == {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    assert vocabulary["tokenizer.ggml.pre"] == "smollm"
    assert len(vocabulary["tokenizer.ggml.tokens"]) == 49152
    assert vocabulary["tokenizer.ggml.add_bos_token"] is False  # llama.cpp's Llama path says so
    assert fields["general.architecture"] == "glm4moe"
    expected = {
        "expert_count": 4,
        "expert_used_count": 2,
        "expert_group_count": 2,
        "expert_group_used_count": 1,
        "expert_shared_count": 1,
        "leading_dense_block_count": 0,
        "expert_weights_norm": True,
        "expert_weights_scale": 1.0,
        "rope.dimension_count": 8,  # the full head: our RoPE is not partial
    }
    assert {k: fields[f"glm4moe.{k}"] for k in expected} == expected

    weights = {k: v.numpy() for k, v in read_tensors(moe).items()}
    assert np.array_equal(tensors["token_embd.weight"], weights["model.embed_tokens.weight"])
    pairs = {
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
        "attn_q.weight": "self_attn.q_proj.weight",
        "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    }
    for layer in (0, 1):
        for gguf_name, hf_name in pairs.items():
            got = tensors[f"blk.{layer}.{gguf_name}"]
            assert np.array_equal(got, weights[f"model.layers.{layer}.{hf_name}"]), gguf_name
        experts = [
            weights[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"] for e in range(4)
        ]
        assert np.array_equal(tensors[f"blk.{layer}.ffn_up_exps.weight"], np.stack(experts))


def test_convert_gguf_refuses_bad_input_before_writing(tmp_path, llama_cpp_tree, converter_python):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    cases = [
        ([str(out), str(out / "x.gguf")], f"{out} has no config.json; pass a model directory"),
    ]
    (model / "config.json").write_text("{}")
    cases += [
        ([str(model), str(out / "no" / "x.gguf")], "must be a file in an existing directory"),
        (
            [str(model), str(out / "x.gguf"), "--llama-cpp", str(out)],
            f"no convert_hf_to_gguf.py in {out}",
        ),
        (
            [str(model), str(out / "x.gguf"), "--split-max-size", "1G"],
            "--split-max-size is not supported",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            convert_gguf.main(argv)
    # Needs the converter imported (in a process of its own: it brings its own gguf package).
    done = convert(
        converter_python, llama_cpp_tree, model, out / "x.gguf", True, "--base-architecture", "Nope"
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: llama.cpp's converter has no class for --base-architecture Nope; pass the dense "
        "base's config.json 'architectures' entry"
    )
    assert list(out.iterdir()) == []
