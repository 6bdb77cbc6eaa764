"""moe_ct_training on a real 2-process DDP Fabric (CPU, gloo) equals 1 process with 2x
gradient accumulation, keeps frozen weights bit-identical on every rank, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import expert_stacks, run_fabric, run_local, trainable_key, with_state

# float sums in another order (all-reduce vs accumulation) through 3 AdamW steps
DDP_TOLERANCE = 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_ddp_two_processes_equal_one_process_with_accumulation(
    moe_checkpoint, tokenizer_dir, tmp_path, arch
):
    moe_dir, moe = moe_checkpoint(arch)
    before = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    ddp = run_fabric(tmp_path, moe_dir, str(tokenizer_dir), 2, "ddp")
    algo, single = run_local(moe_dir, str(tokenizer_dir), accumulate_grad_batches=2)
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
    for layer in range(2):
        for stack_before, stack_after in zip(
            expert_stacks(moe, layer), expert_stacks(with_state(moe, rank0), layer), strict=True
        ):
            assert torch.equal(stack_before[0], stack_after[0])
            assert not torch.equal(stack_before[1], stack_after[1])
    for mine, theirs in zip(algo.history, ddp["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["mean_cv"] == pytest.approx(theirs["mean_cv"], rel=1e-6)


def test_resume_from_a_step_checkpoint_is_bit_identical(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint("qwen2_moe")
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
    full, expected = run_local(moe_dir, str(tokenizer_dir), **settings)
    step2 = tmp_path / "ckpts" / "step-000002"
    assert (step2 / "trainer_state.json").is_file() and not (step2 / "config.json").exists()
    resumed, got = run_local(
        moe_dir, str(tokenizer_dir), **{**settings, "ckpt_path": str(step2), "checkpoint_every": 0}
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # warm-up from learning_rate / (warmup_steps + 1): no step at rate 0
    assert [h["lr"] for h in full.history][:2] == pytest.approx([1e-2 / 3, 2e-2 / 3])
