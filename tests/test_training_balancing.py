"""Balancing modes of moe_ct_training (issue 22): aux-loss-free router-bias balancing on
GLM4-MoE (identical on every DDP rank, reduces MaxVio of a skewed router, saved in step
checkpoints and in the model), the load-balancing loss and routing metrics of sigmoid routers,
and the refusal of bias balancing for a family without a bias."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import (
    add_tokenizer,
    perturbed,
    pool,
    real_text,
    reload_logits,
    run_fabric,
    run_local,
    timeless,
    train_moe,
    weights,
)
from safetensors.torch import load_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.arch import router_biases
from fusion_bench_moect.eval.capture import RouterCapture
from fusion_bench_moect.eval.routing import RoutingAccumulator, max_violation
from fusion_bench_moect.inspection import describe_moe
from fusion_bench_moect.ops.balancing import (
    expert_counts,
    load_balancing_loss,
    router_probabilities,
    update_bias,
)
from fusion_bench_moect.training import MoECTTrainingAlgorithm

BIAS = "e_score_correction_bias"


@pytest.fixture
def glm4_checkpoint(saved, tiny_model, tokenizer_dir):
    """``glm4_checkpoint(skew=0.0) -> (directory, model)``: an 8-expert, top-2 GLM4-MoE saved
    with its tokenizer; ``skew`` > 0 tilts every router's expert 0 toward the mean router
    input, so most tokens pick it."""

    def build(skew: float = 0.0):
        dense = tiny_model("llama")
        models = {"_pretrained_": saved(dense)}
        models.update({name: saved(perturbed(dense, i + 1)) for i, name in enumerate("abc")})
        moe = OrthogonalMoECTMergingAlgorithm(
            architecture="glm4_moe", dtype="float32", granularity=2, experts_per_token=2
        ).run(pool(models, tokenizer=str(tokenizer_dir)))
        if skew:
            _skew(moe, str(tokenizer_dir), skew)
        directory = saved.root / f"glm4_skew{skew}"
        moe.save_pretrained(directory)
        add_tokenizer(tokenizer_dir, directory)
        return str(directory), moe

    return build


@torch.no_grad()
def _skew(moe, tokenizer_dir: str, scale: float) -> None:
    from transformers import AutoTokenizer

    routers = describe_moe(moe).routers
    means = {}
    hooks = [
        r.register_forward_pre_hook(
            lambda m, a, i=i: means.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).mean(0))
        )
        for i, r in enumerate(routers)
    ]
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(real_text())["input_ids"][:256]
    moe(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    for i, router in enumerate(routers):
        router.weight[0] += scale * means[i] / means[i].square().sum()


def biases(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(BIAS)}


# ------------------------------------------------------------------ the formulas
def test_the_load_balancing_loss_is_transformers_for_one_softmax_layer():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    probs = router_probabilities(logits, "softmax")
    counts = expert_counts(torch.topk(probs, 2, dim=-1).indices, 6)
    ours = load_balancing_loss(probs, counts, 50)
    assert torch.allclose(ours, load_balancing_loss_func((logits,), 6, 2), atol=1e-6)
    # sigmoid scores are normalised per token before the mean
    sig = router_probabilities(logits, "sigmoid")
    assert torch.allclose(sig.sum(-1), torch.ones(50))
    assert torch.allclose(sig[3], logits[3].sigmoid() / logits[3].sigmoid().sum())


def test_the_bias_update_is_a_signed_step_toward_the_mean_load():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), 1e-3)  # mean 5
    assert bias.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3, 1e-3])
    update_bias(bias, torch.tensor([3.0, 3.0, 3.0, 3.0]), 1e-3)  # balanced: no move
    assert bias.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3, 1e-3])


@pytest.mark.cross_version  # the routing captured from this major's GLM4-MoE block
def test_metrics_count_the_experts_glm4_moe_actually_selects(
    glm4_checkpoint, tokenizer_dir, real_ids
):
    """A large bias on expert 7 makes every token pick it although its logits do not: the
    captured selection (and so the balance metrics) follow the bias, a softmax top-k would not."""
    _, moe = glm4_checkpoint()
    info = describe_moe(moe)
    for _, bias in router_biases(moe):
        bias[7] = 10.0
    capture = RouterCapture(info.routers)
    with torch.no_grad():
        moe(real_ids)
    logits, selected = capture.take()
    capture.close()
    tokens = real_ids.numel()
    assert [tuple(x.shape) for x in logits] == [(tokens, 8)] * len(info.moe_layers)
    acc = RoutingAccumulator(len(info.moe_layers), 8, 2, "sigmoid")
    acc.update(logits, selected=selected)
    assert acc.counts[:, 7].tolist() == [tokens] * len(info.moe_layers)
    assert max_violation(acc.counts[0]) == pytest.approx(3.0)  # 8 / 2 - 1
    by_logits = RoutingAccumulator(len(info.moe_layers), 8, 2)
    by_logits.update(logits)
    assert by_logits.counts[0, 7] < tokens


# ------------------------------------------------------------------ training
def test_glm4_moe_trains_with_its_load_balancing_loss(glm4_checkpoint, tokenizer_dir):
    moe_dir, moe = glm4_checkpoint()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    algo, trained = train_moe(moe_dir, str(tokenizer_dir), stage="router")
    h = algo.history[-1]
    assert 1.5 < h["aux_loss"] < 4.0  # k = 2 at perfect balance
    assert h["loss"] == pytest.approx(h["lm_loss"] + 0.01 * h["aux_loss"], rel=1e-6)
    assert 0 < h["mean_router_entropy"] <= 1 and h["mean_max_violation"] >= 0
    assert "bias_range" not in h  # no bias balancing: the biases stay zero
    assert all(not v.any() for v in biases(trained.state_dict()).values())
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("gate.weight") for k in changed)


def test_bias_balancing_reduces_maxvio_of_a_skewed_router(glm4_checkpoint, tokenizer_dir):
    """The same batches, the router barely trained (lr 1e-8): only the bias differs."""
    moe_dir, _ = glm4_checkpoint(skew=20.0)
    runs = {}
    for balancing in ("none", "bias"):
        runs[balancing], _ = train_moe(
            moe_dir, str(tokenizer_dir), stage="router", balancing=balancing, bias_update_rate=0.1,
            max_steps=8, batch_size=4, seq_len=64, learning_rate=1e-8,
            eval_sources={"gpl": {"text": real_text()}}, eval_window=64,
        )  # fmt: skip
    none, bias = runs["none"], runs["bias"]
    assert none.evaluations[0] == bias.evaluations[0]  # same start
    start = none.evaluations[0]["mean_max_violation"]
    print(
        "held-out MaxVio: start",
        start,
        "none",
        none.evaluations[-1]["mean_max_violation"],
        "bias",
        bias.evaluations[-1]["mean_max_violation"],
    )
    assert start > 1.0  # skewed: expert 0 takes most tokens (3 = all of them)
    assert bias.evaluations[-1]["mean_max_violation"] < 0.5 * start
    assert none.evaluations[-1]["mean_max_violation"] > 0.9 * start
    late = slice(3, None)
    mean = lambda a: sum(h["mean_max_violation"] for h in a.history[late]) / 5  # noqa: E731
    assert mean(bias) < 0.6 * mean(none)
    assert bias.history[-1]["bias_range"][0][0] < 0 < bias.history[-1]["bias_range"][0][1]


def test_global_batch_scope_on_one_process_and_micro_batch_agree(glm4_checkpoint, tokenizer_dir):
    """One process, one micro-batch per step: the global batch is the micro-batch."""
    moe_dir, _ = glm4_checkpoint()
    micro, _ = train_moe(moe_dir, str(tokenizer_dir), stage="router")
    glob, _ = train_moe(moe_dir, str(tokenizer_dir), stage="router", aux_loss_scope="global_batch")
    assert timeless(micro.history) == timeless(glob.history)
    # two micro-batches: the second one's loss uses the counts of both
    acc, _ = train_moe(
        moe_dir, str(tokenizer_dir), stage="router", accumulate_grad_batches=2, max_steps=1
    )
    acc_glob, _ = train_moe(
        moe_dir, str(tokenizer_dir), stage="router", accumulate_grad_batches=2, max_steps=1,
        aux_loss_scope="global_batch",
    )  # fmt: skip
    assert acc.history[0]["aux_loss"] != acc_glob.history[0]["aux_loss"]
    assert acc.history[0]["lm_loss"] == acc_glob.history[0]["lm_loss"]


@pytest.mark.cross_version  # this major's router biases, reloaded under both
def test_a_bias_balanced_model_reloads_with_its_biases_and_logits(
    glm4_checkpoint,
    tokenizer_dir,
    real_ids,
    tmp_path,
    other_python,
):
    moe_dir, _ = glm4_checkpoint()
    out = tmp_path / "trained"
    algo, trained = train_moe(
        moe_dir, str(tokenizer_dir), stage="experts", balancing="aux_loss+bias", bias_update_rate=0.01,
        save_checkpoint=str(out),
    )  # fmt: skip
    expected = biases(trained.state_dict())
    assert expected and all(v.any() for v in expected.values())
    assert biases(weights(out)).keys() == expected.keys()
    assert all(torch.equal(weights(out)[k], v) for k, v in expected.items())
    with torch.no_grad():
        logits = trained(real_ids).logits
    for python in (sys.executable, other_python):
        got, _ = reload_logits(out, real_ids, tmp_path, python=python)
        assert torch.allclose(got, logits, atol=1e-5), python
    assert (out / "training_history.png").is_file()


def test_resume_with_bias_balancing_is_bit_identical(glm4_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = glm4_checkpoint()
    settings = dict(
        stage="experts", balancing="bias", bias_update_rate=0.01, bias_update_ramp_steps=3,
        max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpts"),
    )  # fmt: skip
    full, expected = run_local(moe_dir, str(tokenizer_dir), **settings)
    step2 = tmp_path / "ckpts" / "step-000002"
    saved_biases = biases(load_file(str(step2 / "trainable.safetensors")))
    assert saved_biases and all(v.any() for v in saved_biases.values())
    resumed, got = run_local(
        moe_dir, str(tokenizer_dir), **{**settings, "ckpt_path": str(step2), "checkpoint_every": 0}
    )
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert timeless(full.history) == timeless(resumed.history)
    # the ramp: rate/3, 2 rate/3, rate, rate -> max |b| after 4 steps <= 0.01 * (1/3 + 2/3 + 2)
    assert full.history[0]["bias_max"] == pytest.approx(0.01 / 3, rel=1e-6)
    assert max(abs(v).max().item() for v in biases(expected).values()) <= 0.03 + 1e-7


def test_bias_updates_are_identical_on_every_ddp_rank(glm4_checkpoint, tokenizer_dir, tmp_path):
    """2 processes: the loads are all-reduced, so both ranks apply the global batch's update,
    the one a single process computes from the same global batch (2 micro-batches)."""
    moe_dir, _ = glm4_checkpoint()
    extra = dict(stage="router", balancing="bias", bias_update_rate=0.01, learning_rate=1e-6)
    ddp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "ddp", **extra)
    rank0, rank1 = (biases(state) for state in ddp["states"])
    assert rank0 and all(v.any() for v in rank0.values())
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    _, single = run_local(moe_dir, str(tokenizer_dir), accumulate_grad_batches=2, **extra)
    assert all(torch.equal(rank0[k], biases(single)[k]) for k in rank0)
    assert ddp["history"][-1]["bias_range"] == [
        [float(v.min()), float(v.max())] for v in rank0.values()
    ]


def test_bias_balancing_on_mixtral_is_refused_naming_glm4_moe(
    moe_checkpoint, tokenizer_dir, tmp_path
):
    moe_dir, _ = moe_checkpoint("mixtral")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"balancing: bias needs a router bias: .*glm4_moe"):
        train_moe(moe_dir, str(tokenizer_dir), balancing="bias", save_checkpoint=str(out))
    assert not out.exists()
    with pytest.raises(ValueError, match="balancing"):
        MoECTTrainingAlgorithm(balancing="biased")


def test_bias_updates_under_fsdp2_equal_one_process(glm4_checkpoint, tokenizer_dir, tmp_path):
    """The sharded preset: the biases are buffers (replicated, not sharded) and every rank
    applies the global batch's update, as one process with 2 micro-batches does."""
    moe_dir, _ = glm4_checkpoint()
    extra = dict(stage="router", balancing="bias", bias_update_rate=0.01, learning_rate=1e-6)
    fsdp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "moe_fsdp2", **extra)
    sharded = biases(fsdp["states"][0])
    assert sharded and all(v.any() for v in sharded.values())
    _, single = run_local(moe_dir, str(tokenizer_dir), accumulate_grad_batches=2, **extra)
    assert all(torch.equal(sharded[k], biases(single)[k]) for k in sharded)
