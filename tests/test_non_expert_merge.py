"""The non-expert weights merged by FusionBench's own algorithms (``non_expert_merge``,
docs/algorithm.md "Non-expert weights"): function preservation, bit-exact agreement with
FusionBench on the dense models, LoRA sources, and the same bytes on every path."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import (
    MERGE_SIMPLE,
    MERGE_TASK_ARITHMETIC,
    MERGE_TIES,
    MERGE_WEIGHTED,
    REPO,
    add_tokenizer,
    fusion_bench,
    max_diff,
    perturbed,
    pool,
    read_tensors,
    reload,
)
from safetensors.torch import load_file

import fusion_bench_moect.ops.non_expert as ops
from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm

#: Every method with two sources (the weighted average has two weights).
METHODS = [MERGE_SIMPLE, MERGE_WEIGHTED, MERGE_TASK_ARITHMETIC, MERGE_TIES]
IDS = ["simple", "weighted", "task_arithmetic", "ties"]


def non_ffn(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".mlp." not in k}


def build(models: dict, tokenizer=None, **params):
    params.setdefault("dtype", "float32")
    return OrthogonalMoECTMergingAlgorithm(**params).run(pool(models, tokenizer=tokenizer))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("family, arch", [("llama", "mixtral"), ("qwen2", "qwen2_moe")])
def test_sources_equal_to_the_base_reproduce_the_base(
    saved, real_ids, tiny_model, method, family, arch
):
    dense = tiny_model(family)
    models = {"_pretrained_": saved(dense), "a": saved(dense), "b": saved(dense)}
    for pattern in (None, "self_attn"):
        moe = build(models, architecture=arch, non_expert_merge=method, non_expert_tensors=pattern)
        assert max_diff(moe, dense, real_ids) <= 1e-5


def test_simple_average_is_the_elementwise_mean_bit_for_bit(saved, tiny_model, monkeypatch):
    monkeypatch.setattr(ops, "PIECE_ELEMENTS", 100)  # the embedding in 231 pieces, q in 8
    dense = tiny_model("llama", tie_word_embeddings=False)
    models = {"_pretrained_": saved(dense, "base")}
    for i in (1, 2, 3):
        models[f"s{i}"] = saved(perturbed(dense, i, ffn_only=False), f"s{i}")
    sources = [load_file(f"{models[f's{i}']}/model.safetensors") for i in (1, 2, 3)]
    default = build(models).state_dict()
    for pattern in (None, "self_attn"):
        moe = build(models, non_expert_merge=MERGE_SIMPLE, non_expert_tensors=pattern)
        state, merged = moe.state_dict(), 0
        for key, tensor in non_ffn(state).items():
            if pattern is None or pattern in key:
                mean = torch.stack([s[key] for s in sources]).mean(dim=0)
                assert torch.equal(tensor, mean), key
                merged += 1
            else:
                assert torch.equal(tensor, default[key]), key
        assert merged == (15 if pattern is None else 8)  # 2 x 6 + embed, norm, lm_head / 2 x 4
        for key, tensor in state.items():  # the experts are exactly today's
            if ".mlp." in key:
                assert torch.equal(tensor, default[key]), key
        record = moe.config.moe_ct
        assert record["params"]["non_expert_merge"] == MERGE_SIMPLE
        assert record["params"]["non_expert_tensors"] == pattern
        assert record["non_expert"] == {
            "method": MERGE_SIMPLE["_target_"],
            "models": ["_pretrained_", "s1", "s2", "s3"],
            "tensors": merged,
            "elementwise": True,
        }
    assert "non_expert" not in build(models).config.moe_ct


def fusion_bench_on_dense(method: dict, dense: list, remove_keys: list[str]) -> dict:
    """FusionBench's own result on the dense models: task arithmetic's ``run`` on copies of
    them (it writes into them); for TIES the steps of ``TiesMergingAlgorithm.run`` with
    ``remove_keys``, through its own functions (its ``run`` cannot load a state dict that
    lacks the removed keys back into a model)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )
    from fusion_bench.modelpool import BaseModelPool
    from hydra.utils import instantiate

    if "remove_keys" not in method:
        names = ["_pretrained_", "a", "b"]
        models = BaseModelPool({n: copy.deepcopy(m) for n, m in zip(names, dense, strict=True)})
        return instantiate(method).run(models).state_dict()
    base, *fine_tuned = (m.state_dict() for m in dense)
    flat_ptm = state_dict_to_vector(base, remove_keys)
    task_vectors = torch.vstack([state_dict_to_vector(s, remove_keys) for s in fine_tuned])
    merged = ties_merging(
        task_vectors - flat_ptm, reset_thresh=method["threshold"], merge_func=method["merge_func"]
    )
    merged_check = flat_ptm + method["scaling_factor"] * merged
    return vector_to_state_dict(merged_check, copy.deepcopy(base), remove_keys=remove_keys)


@pytest.mark.parametrize(
    "method, pattern",
    [
        (MERGE_TASK_ARITHMETIC, None),
        (MERGE_TASK_ARITHMETIC, "self_attn"),
        (MERGE_TIES, None),
        ({**MERGE_TIES, "merge_func": "mean"}, "proj"),
    ],
    ids=["task_arithmetic", "task_arithmetic-attention", "ties-sum", "ties-mean-attention"],
)
def test_task_arithmetic_and_ties_equal_fusion_bench_on_the_dense_models(
    saved, tiny_model, method, pattern
):
    base = tiny_model("llama")
    dense = [base, perturbed(base, 1, ffn_only=False), perturbed(base, 2, ffn_only=False)]
    models = {n: saved(m, n) for n, m in zip(["_pretrained_", "a", "b"], dense, strict=True)}
    moe = non_ffn(build(models, non_expert_merge=method, non_expert_tensors=pattern).state_dict())
    del moe["lm_head.weight"]  # tied: the embedding itself, not a tensor of its own
    chosen = [k for k in moe if pattern is None or pattern in k]
    # TIES trims over all merged tensors together: FusionBench gets exactly those
    removed = [k for k in base.state_dict() if k not in chosen]
    expected = fusion_bench_on_dense(method, dense, removed)
    for key in moe:
        want = expected[key] if key in chosen else base.state_dict()[key]
        assert torch.equal(moe[key], want), key
    assert any(not torch.equal(moe[k], base.state_dict()[k]) for k in chosen)


def lora_adapter(base_model, directory) -> str:
    """A PEFT LoRA adapter with random (non-zero) updates of the FFN and of q_proj."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["gate_proj", "up_proj", "down_proj", "q_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(copy.deepcopy(base_model), config).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_lora_sources_work_with_every_method(saved, tiny_model, method):
    dense = tiny_model("llama", tie_word_embeddings=False)
    base = saved(dense, "base")
    ft = saved(perturbed(dense, 1, ffn_only=False), "ft")
    adapter = lora_adapter(dense, saved.root / "adapter")
    with_lora = build({"_pretrained_": base, "lora": adapter, "ft": ft}, non_expert_merge=method)
    today = build({"_pretrained_": base, "lora": adapter, "ft": ft})
    # the adapter's non-FFN tensors are the base's (its q_proj update is not used, as today)
    as_base = build({"_pretrained_": base, "lora": base, "ft": ft}, non_expert_merge=method)
    got, experts, expected = (m.state_dict() for m in (with_lora, today, as_base))
    for key, tensor in got.items():
        want = experts[key] if ".mlp." in key else expected[key]
        assert torch.equal(tensor, want), key
    if method is MERGE_SIMPLE:
        ft_weights = load_file(f"{ft}/model.safetensors")
        for key, tensor in non_ffn(got).items():
            assert torch.equal(tensor, (dense.state_dict()[key] + ft_weights[key]) / 2), key


def run_params_dropped(directory) -> dict:
    config = json.loads((directory / "config.json").read_text())
    for name in ("save_checkpoint", "streaming"):
        config["moe_ct"]["params"].pop(name)
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize(
    "method, pattern", [(MERGE_SIMPLE, "self_attn|norm"), (MERGE_TASK_ARITHMETIC, None)]
)
def test_lean_cli_and_streaming_write_the_in_memory_bytes(
    saved, tiny_model, tokenizer_dir, real_ids, tmp_path, method, pattern, monkeypatch
):
    from fusion_bench_moect.cli.upcycle import main

    monkeypatch.setattr(ops, "PIECE_ELEMENTS", 1000)
    dense = tiny_model("llama", layers=3)
    base = saved(dense, "base")
    add_tokenizer(tokenizer_dir, base)
    models = {"_pretrained_": base}
    models |= {n: saved(perturbed(dense, i, ffn_only=False), n) for i, n in ((1, "a"), (2, "b"))}
    params = dict(dtype="bfloat16", non_expert_merge=method, non_expert_tensors=pattern)
    in_memory = build(models, base, **params)
    build(models, base, save_checkpoint=str(tmp_path / "stream"), streaming=True, **params)
    argv = [base, str(tmp_path / "cli"), "--dtype", "bfloat16", "-q"]
    argv += [f"--source=a={models['a']}", f"--source=b={models['b']}"]
    argv += ["--non-expert-merge", json.dumps(method)]
    argv += ["--non-expert-tensors", pattern] if pattern else []
    assert main(argv) == 0
    stream, cli = read_tensors(tmp_path / "stream"), read_tensors(tmp_path / "cli")
    assert sorted(stream) == sorted(cli)
    assert all(torch.equal(stream[k], cli[k]) for k in stream)
    for key, tensor in non_ffn(in_memory.state_dict()).items():
        assert torch.equal(stream[key if key in stream else "model.embed_tokens.weight"], tensor)
    assert run_params_dropped(tmp_path / "stream") == run_params_dropped(tmp_path / "cli")
    with torch.no_grad():
        assert torch.equal(reload(tmp_path / "stream")(real_ids).logits, in_memory(real_ids).logits)
    # a method that needs every tensor at once is refused by the streaming CLI, before work
    argv[1] = str(tmp_path / "refused")
    argv[argv.index("--non-expert-merge") + 1] = json.dumps(MERGE_TIES)
    assert main(argv) == 2 and not (tmp_path / "refused").exists()


def test_the_fusion_bench_cli_takes_the_config_as_docs_algorithm_md_writes_it(
    saved, tiny_model, tmp_path
):
    dense = tiny_model("llama")
    models = {"_pretrained_": saved(dense, "base")}
    models |= {n: saved(perturbed(dense, i, ffn_only=False), n) for i, n in ((1, "de"), (2, "fr"))}
    out, logs = tmp_path / "moe", tmp_path / "logs"
    fusion_bench(
        REPO,
        "method=moe_ct_upcycling",
        "modelpool=CausalLMPool/moe_ct_merge",
        f"modelpool.models._pretrained_={models['_pretrained_']}",
        f"modelpool.models.expert_de={models['de']}",
        f"modelpool.models.expert_fr={models['fr']}",
        "modelpool.tokenizer=null",
        "taskpool=dummy",
        "method.non_expert_merge={_target_:fusion_bench.method.TaskArithmeticAlgorithm,"
        "scaling_factor:0.3}",
        "method.non_expert_tensors=self_attn",
        "method.dtype=float32",
        f"method.save_checkpoint={out}",
        f"hydra.run.dir={logs}",
        f"path.log_dir={logs}",
    )
    record = json.loads((out / "config.json").read_text())["moe_ct"]
    assert record["params"]["non_expert_merge"] == MERGE_TASK_ARITHMETIC
    assert record["non_expert"]["tensors"] == 8  # q, k, v, o of 2 layers
    expected = build(
        {
            "_pretrained_": models["_pretrained_"],
            "expert_de": models["de"],
            "expert_fr": models["fr"],
        },
        non_expert_merge=MERGE_TASK_ARITHMETIC,
        non_expert_tensors="self_attn",
    )
    written = read_tensors(out)
    for key, tensor in non_ffn(expected.state_dict()).items():
        assert torch.equal(written[key if key in written else "model.embed_tokens.weight"], tensor)


def test_the_study_row_compares_the_merges_of_one_setting():
    from fusion_bench_moect.params import MoECTConfig
    from study.non_expert import VARIANTS, rows

    built = rows()
    assert [r["name"] for r in built] == list(VARIANTS)
    reference = built[0]["params"]
    for row in built:
        MoECTConfig(**row["params"])  # valid parameters
        changed = {k: v for k, v in row["params"].items() if reference.get(k) != v}
        assert changed == VARIANTS[row["name"]]


@pytest.mark.parametrize("shape, limit", [((7,), 3), ((10, 4), 8), ((5, 100), 30), ((3, 2, 2), 4)])
def test_row_pieces_cover_every_row_once_within_the_limit(shape, limit):
    pieces = ops.row_pieces(shape, limit)
    rows = [i for piece in pieces for i in range(shape[0])[piece]]
    assert rows == list(range(shape[0]))
    per_row = math.prod(shape[1:])
    assert all(len(range(shape[0])[p]) * per_row <= max(limit, per_row) for p in pieces)


def test_select_tensors_by_pattern():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
    ]
    assert ops.select_tensors(names, None) == names
    assert ops.select_tensors(names, "self_attn|^model.norm") == names[1:]
    with pytest.raises(ValueError, match="matches none of the base's 3 non-FFN tensors"):
        ops.select_tensors(names, "mlp")
