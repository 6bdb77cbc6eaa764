"""The GLM4-MoE output (issue 22): sigmoid routing with a zero selection bias, group-limited
routing, an ungated shared expert and leading dense layers, from every dense base family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import add_tokenizer, max_diff, perturbed, pool, reload_logits
from transformers import AutoTokenizer

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.arch import router_biases
from fusion_bench_moect.inspection import expert_triples, moe_block
from fusion_bench_moect.ops.fusion import lerp_fuse
from fusion_bench_moect.ops.routers import group_routing_problem

# Version-sensitive (the GLM4-MoE layout in this major, reloaded under both): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version

TOL = 1e-5
FFN = ("gate_proj", "up_proj", "down_proj")


def build(models: dict[str, str], tokenizer: str | None = None, **params):
    params.setdefault("dtype", "float32")
    algo = OrthogonalMoECTMergingAlgorithm(architecture="glm4_moe", **params)
    return algo.run(pool(models, tokenizer=tokenizer))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "params",
    [
        dict(num_experts=8, experts_per_token=2),
        dict(num_experts=8, experts_per_token=4, granularity=2, n_group=2, topk_group=1),
        dict(num_experts=4, moe_layers=[1, 2], shared_expert_share=0.3),
    ],
)
def test_pure_upcycling_equals_the_dense_base(saved, real_ids, family, params, tiny_model):
    dense = tiny_model(family, layers=3)
    moe = build({"_pretrained_": saved(dense)}, **params)
    assert type(moe).__name__ == "Glm4MoeForCausalLM"
    assert max_diff(moe, dense, real_ids) < TOL


def test_the_config_and_the_zero_router_bias(saved, real_ids, tiny_model):
    dense = tiny_model("qwen3", layers=3)
    inter = dense.config.intermediate_size
    moe = build(
        {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))},
        granularity=2,
        experts_per_token=2,
        moe_layers=[1, 2],
        shared_experts=["_pretrained_", "ft"],
    )
    c = moe.config
    assert (c.n_routed_experts, c.num_experts_per_tok) == (4, 2)
    assert (c.moe_intermediate_size, c.intermediate_size) == (inter // 2, inter)
    assert c.n_shared_experts == 2 * 2  # two FFNs of width I = 4 x (I / 2)
    assert c.first_k_dense_replace == 1 and c.num_nextn_predict_layers == 0
    assert c.norm_topk_prob is True and c.routed_scaling_factor == 1.0
    assert (c.n_group, c.topk_group) == (1, 1)
    assert c.use_qk_norm is True and c.attention_bias is False  # Qwen3: q/k norms, no biases
    rotary = getattr(c, "rope_parameters", None) or {}
    assert rotary.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None)) == 1.0
    assert moe_block(moe.model.layers[0]) is None
    assert torch.equal(
        moe.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight
    )
    # the trainer's handle on the biases: the live buffers, zero and float32
    biases = router_biases(moe)
    assert [i for i, _ in biases] == [1, 2]
    for _, bias in biases:
        assert bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(4))
    biases[0][1].add_(0.5)
    assert moe.model.layers[1].mlp.gate.e_score_correction_bias[0].item() == 0.5


def test_router_biases_of_a_family_without_one_name_glm4_moe(saved, tiny_model):
    moe = OrthogonalMoECTMergingAlgorithm(num_experts=2, dtype="float32").run(
        pool({"_pretrained_": saved(tiny_model("llama"))})
    )
    with pytest.raises(ValueError, match="mixtral model's router has no selection bias.*glm4_moe"):
        router_biases(moe)


def test_experts_and_shared_expert_follow_the_moe_ct_formula(saved, tiny_model):
    dense = tiny_model("llama")
    sources = {"a": perturbed(dense, 1, scale=0.2), "b": perturbed(dense, 2, scale=0.2)}
    models = {"_pretrained_": saved(dense), **{n: saved(m) for n, m in sources.items()}}
    alpha, g, w = 0.6, 2, 0.3
    moe = build(
        models,
        alpha_strategy="constant",
        base_alpha=alpha,
        granularity=g,
        experts_per_token=2,
        shared_expert_share=w,
        shared_experts=["_pretrained_", {"source": "a", "residual_scale": 0.5}],
    )
    for layer in range(dense.config.num_hidden_layers):
        base = [getattr(dense.model.layers[layer].mlp, p).weight for p in FFN]
        fused = {
            n: [
                lerp_fuse(b, getattr(m.model.layers[layer].mlp, p).weight, alpha)
                for b, p in zip(base, FFN, strict=True)
            ]
            for n, m in sources.items()
        }
        full = [base, fused["a"], fused["b"]]  # expert groups: base (anchor), a, b
        block = moe_block(moe.model.layers[layer])
        size = base[0].shape[0] // g
        for e, (gate, up, down) in enumerate(expert_triples(block)):
            f_gate, f_up, f_down = full[e // g]
            rows = slice((e % g) * size, (e % g + 1) * size)
            assert torch.equal(gate, f_gate[rows]) and torch.equal(up, f_up[rows])
            assert torch.allclose(down, f_down[:, rows] * g * (1 - w), atol=1e-7)
        shared = block.shared_experts
        assert torch.equal(shared.gate_proj.weight, torch.cat([base[0], fused["a"][0]]))
        # no gate: each of the n = 2 FFNs carries w / n of the output, times its residual scale
        expected = torch.cat([base[2] * w / 2, fused["a"][2] * w / 2 * 0.5], dim=1)
        assert torch.allclose(shared.down_proj.weight, expected, atol=1e-7)


def test_group_routing_checks():
    assert group_routing_problem(8, 2, 1, 4, 2) is None
    assert "does not divide" in group_routing_problem(8, 2, 1, 3, 1)
    assert "best two experts" in group_routing_problem(8, 2, 1, 8, 2)
    assert "split the FFNs of granularity 4" in group_routing_problem(8, 4, 4, 4, 2)
    assert "exceeds n_group" in group_routing_problem(8, 2, 1, 2, 3)
    assert "raise topk_group to 2" in group_routing_problem(8, 3, 1, 4, 1)


def test_group_routing_keeps_the_function_and_orthogonal_rows(saved, real_ids, tiny_model):
    dense = tiny_model("qwen2")
    moe = build(
        {"_pretrained_": saved(dense)}, num_experts=8, experts_per_token=2, n_group=4, topk_group=2
    )
    assert (moe.config.n_group, moe.config.topk_group) == (4, 2)
    router = moe.model.layers[0].mlp.gate.weight.float()
    assert torch.allclose(router @ router.T, torch.eye(8), atol=1e-5)
    assert max_diff(moe, dense, real_ids) < TOL


@pytest.mark.parametrize(
    "architecture, params, message",
    [
        (
            "mixtral",
            dict(n_group=2),
            "n_group: the mixtral output has no group-limited routing; use architecture: "
            "glm4_moe, or leave n_group and topk_group at 1.",
        ),
        ("glm4_moe", dict(n_group=3), "n_group=3 does not divide num_experts=8"),
        (
            "glm4_moe",
            dict(moe_layers=[0, 2]),
            r"moe_layers: the glm4_moe output keeps only leading layers dense "
            r"\(first_k_dense_replace\), not \[1\] of 3; use architecture: qwen2_moe or "
            "qwen3_moe, or leave moe_layers unset.",
        ),
        ("glm4_moe", dict(moe_layers="auto_from_alpha"), "keeps only leading layers dense"),
        ("glm4_moe", dict(prompts={"shared_expert": ["x"]}), "gate, which the glm4_moe output"),
    ],
)
def test_refusals(saved, architecture, params, message, tiny_model):
    path = saved(tiny_model("llama", layers=3))
    with pytest.raises(ValueError, match=message):
        OrthogonalMoECTMergingAlgorithm(architecture=architecture, num_experts=8, **params).run(
            pool({"_pretrained_": path})
        )


def test_bases_glm4_moe_cannot_represent_are_refused(saved, tiny_model):
    for family, overrides, message in [
        ("mistral", dict(sliding_window=16), "sliding_window=16; use architecture: mixtral"),
        ("llama", dict(attention_bias=True), "o_proj.bias' of the llama base; use architecture"),
    ]:
        path = saved(tiny_model(family, **overrides))
        with pytest.raises(ValueError, match=message):
            build({"_pretrained_": path}, num_experts=2)


def test_auto_from_alpha_with_leading_zero_alphas(saved, tiny_model):
    dense = tiny_model("llama", layers=3)
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    moe = build(models, alpha_strategy="linear_increase", moe_layers="auto_from_alpha")
    assert moe.config.first_k_dense_replace == 1  # alpha 0 at layer 0 only
    assert moe.config.moe_ct["moe_layers"] == [1, 2]


def test_prompt_gates_read_the_router_input_of_every_family(saved, tiny_model, tokenizer_dir):
    dense = tiny_model("qwen3")
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    prompts = {"_pretrained_": ["general text"], "ft": ["the license terms"]}
    rows = {}
    for architecture in ("glm4_moe", "qwen3_moe"):
        moe = OrthogonalMoECTMergingAlgorithm(
            architecture=architecture, gate_mode="hidden", prompts=prompts, dtype="float32"
        ).run(pool(models, tokenizer=str(tokenizer_dir)))
        rows[architecture] = [moe_block(layer).gate.weight for layer in moe.model.layers]
    assert all(torch.equal(a, b) for a, b in zip(*rows.values(), strict=True))


def test_checkpoint_reloads_in_both_majors(saved, real_ids, tmp_path, tiny_model, other_python):
    dense = tiny_model("qwen2", layers=3)
    models = {"_pretrained_": saved(dense), "ft": saved(perturbed(dense, 1))}
    params = dict(granularity=2, experts_per_token=2, n_group=2, topk_group=1, moe_layers=[1, 2])
    moe = build(models, dtype="bfloat16", **params)
    out = tmp_path / "moe"
    build(models, dtype="bfloat16", save_checkpoint=str(out), streaming=True, **params)
    config = json.loads((out / "config.json").read_text())
    assert config["partial_rotary_factor"] == 1.0  # for transformers 4 (5 reads rope_parameters)
    with torch.no_grad():
        expected = moe(real_ids).logits.float()
    for python in (sys.executable, other_python):
        logits, _ = reload_logits(out, real_ids, tmp_path, python=python)
        assert (logits.float() - expected).abs().max().item() == 0.0, python


GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
# the tokenizer file alone: a tokenizer_config.json of one major names a class the other lacks
tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1] + "/tokenizer.json")
ids = tok("The GNU General Public License is", return_tensors="pt").input_ids
names, out = [], []
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    names.append(type(model).__name__)
    out.append(model.generate(ids, max_new_tokens=8, do_sample=False).tolist())
print(names[0], out[0] == out[1], out[0])
"""


def test_generation_in_a_fresh_process_matches_the_dense_base(
    saved, tmp_path, tiny_model, tokenizer_dir, other_python
):
    dense = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dense.generation_config.pad_token_id = tok.eos_token_id
    base = saved(dense)
    add_tokenizer(tokenizer_dir, base)
    out = tmp_path / "moe"
    build(
        {"_pretrained_": base},
        tokenizer=base,
        num_experts=4,
        save_checkpoint=str(out),
        streaming=True,
    )
    for python in (sys.executable, other_python):
        run = subprocess.run(
            [python, "-c", GENERATE, str(out), base], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.startswith("Glm4MoeForCausalLM True "), run.stdout
