"""moe_layers (dense layers via mlp_only_layers) and Qwen2-MoE shared experts from several FFNs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import max_diff, perturbed, pool, real_text, reload_logits

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.ops.layers import AUTO_FROM_ALPHA, dense_layers, resolve_moe_layers
from fusion_bench_moect.ops.shared import concat_ffns, shared_expert_scales

# Version-sensitive (dense layers and shared experts in this major's Qwen-MoE): also run under transformers 4.57.
pytestmark = pytest.mark.cross_version

TOL = 1e-5


def engine(models: dict[str, str], architecture: str, stream_to=None, **params):
    """Build in memory (or stream to ``stream_to``); returns the model (None when streamed)
    and the ``moe_ct`` record."""
    algo = OrthogonalMoECTMergingAlgorithm(
        architecture=architecture,
        dtype="float32",
        save_checkpoint=None if stream_to is None else str(stream_to),
        streaming=stream_to is not None,
        **params,
    )
    moe = algo.run(pool(models))
    if moe is None:
        return None, json.loads((stream_to / "config.json").read_text())["moe_ct"]
    return moe, moe.config.moe_ct


# -- moe_layers ------------------------------------------------------------------------------


def test_resolve_moe_layers():
    alphas = [0.8, 0.4, 0.0, 0.4, 0.8]
    assert resolve_moe_layers(None, alphas) == [0, 1, 2, 3, 4]
    assert resolve_moe_layers([3, 0], alphas) == [0, 3]
    assert resolve_moe_layers(AUTO_FROM_ALPHA, alphas) == [0, 1, 3, 4]
    assert dense_layers([0, 3], 5) == [1, 2, 4]
    for bad, match in [
        ([5], r"not a layer index in \[0, 4\]"),
        ([-1], "not a layer index"),
        ([True], "not a layer index"),
        ([1, 1], "lists layer 1 twice"),
        ([], "no layer would become MoE"),
        ("middle", "Unknown moe_layers 'middle'"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_moe_layers(bad, alphas)
    with pytest.raises(ValueError, match="every alpha is 0"):
        resolve_moe_layers(AUTO_FROM_ALPHA, [0.0, 0.0])


@pytest.mark.parametrize("family, arch", [("qwen3", "qwen3_moe"), ("llama", "qwen2_moe")])
def test_moe_layers_pure_upcycling_reproduces_the_base(saved, real_ids, family, arch, tiny_model):
    dense = tiny_model(family, layers=3)
    moe, record = engine(
        {"_pretrained_": saved(dense)}, arch, num_experts=4, granularity=2, moe_layers=[0, 2]
    )
    assert moe.config.mlp_only_layers == [1] and record["moe_layers"] == [0, 2]
    middle = moe.model.layers[1].mlp
    assert not hasattr(middle, "experts")
    assert torch.equal(middle.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert hasattr(moe.model.layers[0].mlp, "experts")
    assert max_diff(moe, dense, real_ids) < TOL


def test_auto_from_alpha_keeps_alpha_zero_layers_dense(saved, real_ids, tiny_model):
    dense = tiny_model("qwen3", layers=3)
    models = {"_pretrained_": saved(dense), "de": saved(perturbed(dense, 1))}
    moe, record = engine(models, "qwen3_moe", moe_layers=AUTO_FROM_ALPHA)  # u_shaped: 0.8, 0, 0.8
    assert record["alphas"][1] == 0.0 and record["moe_layers"] == [0, 2]
    assert moe.config.mlp_only_layers == [1] and len(record["router_condition_numbers"]) == 2
    assert record["params"]["moe_layers"] == "auto_from_alpha"
    # the same model with every layer MoE differs only in layer 1, where its experts are B's FFN
    full, _ = engine(models, "qwen3_moe")
    assert max_diff(moe, full, real_ids) < TOL


def test_streamed_checkpoint_with_dense_layers_and_wide_shared_expert_reloads(
    saved, real_ids, tmp_path, tiny_model, other_python
):
    """The streaming sink writes the same model; it reloads in both transformers majors."""
    dense = tiny_model("llama", layers=3)
    models = {"_pretrained_": saved(dense), "de": saved(perturbed(dense, 1))}
    options = dict(moe_layers=[1, 2], shared_experts=["de", "_pretrained_"])
    moe, _ = engine(models, "qwen2_moe", **options)
    out = tmp_path / "moe"
    engine(models, "qwen2_moe", stream_to=out, **options)
    with torch.no_grad():
        expected = moe(real_ids).logits
    for python in (sys.executable, other_python):
        logits, _ = reload_logits(out, real_ids, tmp_path, python=python)
        assert (logits - expected).abs().max().item() < TOL


def test_moe_layers_needs_a_family_with_dense_layers(saved, tiny_model):
    with pytest.raises(ValueError, match="use architecture: qwen2_moe or qwen3_moe"):
        engine({"_pretrained_": saved(tiny_model("llama"))}, "mixtral", moe_layers=[0])


# -- shared experts ------------------------------------------------------------------------


def test_concatenated_ffn_is_the_weighted_sum_of_its_ffns():
    gen = torch.Generator().manual_seed(0)
    hidden, inter = 8, 6

    def ffn():
        return [
            torch.randn(inter, hidden, generator=gen),
            torch.randn(inter, hidden, generator=gen),
            torch.randn(hidden, inter, generator=gen),
        ]

    def run(f, x):
        return (torch.nn.functional.silu(x @ f[0].T) * (x @ f[1].T)) @ f[2].T

    ffns = [ffn(), ffn(), ffn()]
    scales = shared_expert_scales(0.5, [1.0, 0.5, 2.0], 2.0)  # a sigmoid gate at 0
    assert scales == pytest.approx([1 / 3, 1 / 6, 2 / 3])
    merged = concat_ffns(ffns, scales, torch.float64)
    assert merged[0].shape == (3 * inter, hidden) and merged[2].shape == (hidden, 3 * inter)
    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    expected = sum(s * run([w.double() for w in f], x) for f, s in zip(ffns, scales, strict=True))
    assert torch.allclose(run(merged, x), expected, atol=1e-12)


def test_base_only_shared_expert_is_todays_and_exact(saved, real_ids, tiny_model):
    dense = tiny_model("llama")
    path = saved(dense)
    default, _ = engine({"_pretrained_": path}, "qwen2_moe", num_experts=4)
    explicit, record = engine(
        {"_pretrained_": path}, "qwen2_moe", num_experts=4, shared_experts=["_pretrained_"]
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(default.state_dict().values(), explicit.state_dict().values(), strict=True)
    )
    assert max_diff(explicit, dense, real_ids) < TOL
    assert record["shared_experts"] == [
        {"name": "_pretrained_", "source": "_pretrained_", "residual_scale": 1.0}
    ]


def test_shared_expert_from_several_models(saved, real_ids, tiny_model):
    dense = tiny_model("llama")
    ft = perturbed(dense, 1, scale=0.2)
    models = {"_pretrained_": saved(dense), "de": saved(ft)}
    moe, record = engine(
        models,
        "qwen2_moe",
        alpha_strategy="constant",
        base_alpha=1.0,
        shared_experts=["_pretrained_", {"source": "de", "residual_scale": 0.5}],
    )
    inter = dense.config.intermediate_size
    assert moe.config.shared_expert_intermediate_size == 2 * inter
    shared = moe.model.layers[0].mlp.shared_expert
    base_mlp, ft_mlp = dense.model.layers[0].mlp, ft.model.layers[0].mlp
    assert torch.equal(shared.gate_proj.weight[:inter], base_mlp.gate_proj.weight)
    assert torch.equal(shared.up_proj.weight[inter:], ft_mlp.up_proj.weight)  # alpha 1
    # down: 2w/n * r = 1/2 for the base, 1/4 for de (residual_scale 0.5)
    assert torch.allclose(shared.down_proj.weight[:, :inter], base_mlp.down_proj.weight * 0.5)
    assert torch.allclose(shared.down_proj.weight[:, inter:], ft_mlp.down_proj.weight * 0.25)
    # with alpha 0 every FFN of the shared expert is B's: still exact
    moe0, _ = engine(
        models,
        "qwen2_moe",
        alpha_strategy="constant",
        base_alpha=0.0,
        shared_experts=["_pretrained_", "de"],
    )
    assert max_diff(moe0, dense, real_ids) < TOL


def test_families_without_a_shared_expert_record_none(saved, tiny_model):
    _, record = engine({"_pretrained_": saved(tiny_model("llama"))}, "mixtral", num_experts=2)
    assert record["shared_experts"] == [] and record["moe_layers"] == [0, 1]


def test_bad_shared_experts(saved, tiny_model):
    path = saved(tiny_model("llama"))
    for value, arch, match in [
        (["nope"], "qwen2_moe", "not in the model pool"),
        (["_pretrained_", "_pretrained_"], "qwen2_moe", "twice"),
        ([{"model": "_pretrained_"}], "qwen2_moe", "give a pool name"),
        ([], "qwen2_moe", "shared_experts is empty"),
        (
            ["_pretrained_"],
            "mixtral",
            "no shared expert; use architecture: qwen2_moe or glm4_moe, or leave",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            engine({"_pretrained_": path}, arch, num_experts=2, shared_experts=value)


def test_task_pool_routing_statistics_skip_dense_layers(saved, tmp_path, tiny_model, tokenizer_dir):
    from fusion_bench_moect.eval.taskpool import MoETextTaskPool

    text = tmp_path / "gpl.txt"
    text.write_text(real_text())
    moe, _ = engine(
        {"_pretrained_": saved(tiny_model("qwen3", layers=3))},
        "qwen3_moe",
        num_experts=4,
        moe_layers=[0, 2],
    )
    report = MoETextTaskPool(
        sources={"gpl": str(text)},
        tokenizer=str(tokenizer_dir),
        max_tokens_per_source=48,
        window_length=24,
        show_progress=False,
    ).evaluate(moe)
    assert [layer["layer"] for layer in report["routing"]["layers"]] == [0, 2]


def test_lean_cli_options(saved, tmp_path, tiny_model):
    from fusion_bench_moect.cli.upcycle import main

    dense = tiny_model("llama", layers=3)
    base, ft = saved(dense), saved(perturbed(dense, 1))
    out = tmp_path / "out"
    args = [base, str(out), "--source", f"ft={ft}", "--architecture", "qwen2_moe", "-q"]
    assert main([*args, "--moe-layers", "0,2", "--shared-experts", "_pretrained_", "ft=0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_only_layers"] == [1]
    assert config["shared_expert_intermediate_size"] == 2 * dense.config.intermediate_size
    assert config["moe_ct"]["shared_experts"][1] == {
        "name": "ft",
        "source": "ft",
        "residual_scale": 0.5,
    }


def test_shared_expert_gate_from_prompts(saved, tmp_path, tiny_model, tokenizer_dir):
    from transformers import AutoTokenizer

    from fusion_bench_moect.prompt_gates import prompt_router_rows

    dense = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shared = ["This License applies to any program or other work."]
    prompts = {
        "expert_0": ["You may convey verbatim copies of the Program's source code."],
        "expert_1": ["Everyone is permitted to copy and distribute."],
        "shared_expert": shared,
    }
    base = saved(dense)
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, gate_mode="hidden", prompts=prompts, architecture="qwen2_moe"
    )
    moe = algo.run(pool({"_pretrained_": base}, tokenizer=str(tokenizer_dir)))
    expected = prompt_router_rows(dense, tok, [(shared, [])], "hidden")
    for layer, row in zip(moe.model.layers, expected, strict=True):
        assert torch.allclose(layer.mlp.shared_expert_gate.weight, row.to(torch.float32))
        assert layer.mlp.shared_expert_gate.weight.norm().item() == pytest.approx(1.0)
    # the streaming sink writes the same gate
    out = tmp_path / "streamed"
    OrthogonalMoECTMergingAlgorithm(
        num_experts=2,
        gate_mode="hidden",
        prompts=prompts,
        architecture="qwen2_moe",
        save_checkpoint=str(out),
        streaming=True,
    ).run(pool({"_pretrained_": base}, tokenizer=str(tokenizer_dir)))
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    for i, layer in enumerate(moe.model.layers):
        key = f"model.layers.{i}.mlp.shared_expert_gate.weight"
        assert torch.equal(written[key], layer.mlp.shared_expert_gate.weight)
    # the routers are those without the shared entry
    del prompts["shared_expert"]
    algo = OrthogonalMoECTMergingAlgorithm(
        num_experts=2, gate_mode="hidden", prompts=prompts, architecture="qwen2_moe"
    )
    plain = algo.run(pool({"_pretrained_": base}, tokenizer=str(tokenizer_dir)))
    assert torch.equal(plain.model.layers[0].mlp.gate.weight, moe.model.layers[0].mlp.gate.weight)
    assert plain.model.layers[0].mlp.shared_expert_gate.weight.abs().max() < 1e-20
    prompts["shared_expert"] = shared
    for params, match in [
        (
            dict(architecture="mixtral", gate_mode="hidden"),
            "which the mixtral output has not; use architecture: qwen2_moe,",
        ),
        (dict(architecture="qwen2_moe", gate_mode="orthogonal"), "needs gate_mode hidden"),
    ]:
        with pytest.raises(ValueError, match=match):
            OrthogonalMoECTMergingAlgorithm(num_experts=2, prompts=prompts, **params).run(
                pool({"_pretrained_": base}, tokenizer=str(tokenizer_dir))
            )
