"""moe_ct_training on a real 2-process DDP Fabric (CPU, gloo) equals 1 process with 2x
gradient accumulation, keeps frozen weights bit-identical on every rank, and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pool, real_text
from test_training import build, tok_dir  # noqa: F401 - fixture

from fusion_bench_moect.training import MoECTTrainingAlgorithm

WORKER = Path(__file__).with_name("fabric_worker.py")
REPO = WORKER.parents[1]
# float sums in another order (all-reduce vs accumulation) through 3 AdamW steps
DDP_TOLERANCE = 1e-5


def params(**extra):
    return {
        "train_sources": {"gpl": {"text": real_text()}},
        "stage": "experts",
        "max_steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        **extra,
    }


def run_fabric(tmp_path, moe_dir, tok, devices, strategy, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {
        "moe_dir": moe_dir,
        "tokenizer": tok,
        "params": params(**extra),
        "devices": devices,
        "strategy": strategy,
        "output": str(tmp_path / f"{strategy}{devices}.pt"),
    }
    spec_path = tmp_path / f"{strategy}{devices}.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, str(WORKER), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=600,
        # the tests' helpers, and this checkout's package before an installed one
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (WORKER.parent, REPO)))},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return torch.load(spec["output"], weights_only=False)


def run_local(moe_dir, tok, **extra):
    algo = MoECTTrainingAlgorithm(accelerator="cpu", **params(**extra))
    model = algo.run(
        pool({"_pretrained_": moe_dir}, tokenizer=tok, model_kwargs={"dtype": "float32"})
    )
    return algo, {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_key(key: str) -> bool:
    return ("gate.weight" in key or ".experts." in key) and "shared_expert" not in key


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_ddp_two_processes_equal_one_process_with_accumulation(saved, tok_dir, tmp_path, arch):  # noqa: F811
    moe_dir, moe = build(saved, tok_dir, arch)
    before = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    ddp = run_fabric(tmp_path, moe_dir, tok_dir, 2, "ddp")
    algo, single = run_local(moe_dir, tok_dir, accumulate_grad_batches=2)
    rank0, rank1 = ddp["states"]
    worst = 0.0
    for key, value in single.items():
        # every rank holds the same weights, bit for bit
        assert torch.equal(rank0[key], rank1[key]), key
        worst = max(worst, (rank0[key] - value).abs().max().item())
        if not trainable_key(key):  # non-FFN weights, shared expert: untouched on every rank
            assert torch.equal(rank0[key], before[key]), key
    print(f"{arch}: max |DDP(2) - 1 process x 2 accumulation| = {worst:.3g}")
    assert worst < DDP_TOLERANCE
    changed = [k for k in single if not torch.equal(single[k], before[k])]
    assert changed and all(trainable_key(k) for k in changed)
    # the anchor (expert 0) is bit-identical after DDP training, the other experts moved
    from test_experts import expert_stacks

    for layer in range(2):
        for stack_before, stack_after in zip(
            expert_stacks(moe, layer), expert_stacks(_load(moe, rank0), layer), strict=True
        ):
            assert torch.equal(stack_before[0], stack_after[0])
            assert not torch.equal(stack_before[1], stack_after[1])
    for mine, theirs in zip(algo.history, ddp["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["mean_cv"] == pytest.approx(theirs["mean_cv"], rel=1e-6)


def _load(model, state):
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def test_resume_from_a_step_checkpoint_is_bit_identical(saved, tok_dir, tmp_path):  # noqa: F811
    moe_dir, _ = build(saved, tok_dir, "qwen2_moe")
    settings = dict(
        stage="router_then_experts",
        router_warmup_steps=2,
        max_steps=4,
        warmup_steps=2,
        aux_loss_ramp_steps=3,
        router_z_loss_coef=1e-3,
        accumulate_grad_batches=2,
        checkpoint_every=2,
        checkpoint_dir=str(tmp_path / "ckpts"),
    )
    full, expected = run_local(moe_dir, tok_dir, **settings)
    step2 = tmp_path / "ckpts" / "step-000002"
    assert (step2 / "trainer_state.json").is_file() and not (step2 / "config.json").exists()
    resumed, got = run_local(
        moe_dir, tok_dir, **{**settings, "ckpt_path": str(step2), "checkpoint_every": 0}
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # warm-up from learning_rate / (warmup_steps + 1): no step at rate 0
    assert [h["lr"] for h in full.history][:2] == pytest.approx([1e-2 / 3, 2e-2 / 3])
