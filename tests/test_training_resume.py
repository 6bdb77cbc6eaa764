"""Exact resume from every entry point, lean step checkpoints, and resume refusals.

Resumes end bit-identical to the uninterrupted run (weights, optimiser state, history but
its wall-clock tokens/s): through the ``fusion_bench`` CLI with the default schedule after
its warm-up (FusionBench's cosine schedule computes rates with numpy there), under 2 DDP
processes, and across the router -> experts stage switch (test_training_ddp). A step
checkpoint holds only the trainable tensors and their optimiser state; a bad ``ckpt_path``
gets one line naming the problem, and nothing is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    local_train,
    pool,
    real_text,
    run_fabric,
    timeless,
    train_cli,
    training_history,
    weights,
)
from safetensors.torch import load_file

from fusion_bench_moect.training import MoECTTrainingAlgorithm


def test_cli_resume_after_the_warm_up_is_exact(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, moe = moe_checkpoint("mixtral")
    ckpts = tmp_path / "ckpts"
    tok = str(tokenizer_dir)
    full = train_cli(tmp_path, tmp_path / "full", moe_dir, tok, "method.checkpoint_every=2",
                     f"method.checkpoint_dir={ckpts}")  # fmt: skip
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    step2 = ckpts / "step-000002"
    manifest = json.loads((step2 / "trainer_state.json").read_text())
    assert manifest["history"][-1]["lr"] < 1e-2  # past the (default, 0-step) warm-up
    # lean: the trainable tensors and their AdamW moments, not the model
    trainable = load_file(str(step2 / "trainable.safetensors"))
    moments = load_file(str(step2 / "optimizer.safetensors"))
    assert set(moments) == {
        f"{k}::{m}" for k in trainable for m in ("step", "exp_avg", "exp_avg_sq")
    }
    frozen = sum(v.numel() for k, v in moe.state_dict().items() if k not in trainable)
    assert frozen > 0 and not (step2 / "model.safetensors").exists()
    resumed = train_cli(tmp_path, tmp_path / "resumed", moe_dir, tok, f"method.ckpt_path={step2}")
    assert weights(full).keys() == weights(resumed).keys()
    assert all(torch.equal(weights(full)[k], weights(resumed)[k]) for k in weights(full))
    assert training_history(full) == training_history(resumed)


def test_ddp_resume_is_exact(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint("qwen2_moe")
    settings = dict(max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpts"))
    full = run_fabric(tmp_path / "a", moe_dir, str(tokenizer_dir), 2, "ddp", **settings)
    step2 = tmp_path / "ckpts" / "step-000002"
    assert sorted(p.name for p in step2.glob("rng-rank*.json")) == [
        "rng-rank0.json",
        "rng-rank1.json",
    ]
    resumed = run_fabric(
        tmp_path / "b", moe_dir, str(tokenizer_dir), 2, "ddp",
        **{**settings, "checkpoint_every": 0, "ckpt_path": str(step2)},
    )  # fmt: skip
    for rank in range(2):
        for key, value in full["states"][rank].items():
            assert torch.equal(value, resumed["states"][rank][key]), (rank, key)
    assert timeless(resumed["history"]) == timeless(full["history"])


# 2 micro-batches per step reduced over 2 processes or accumulated in one: the same windows,
# summed in another order
RESHARD_TOLERANCE = 1e-5


@pytest.mark.parametrize("strategy, before, after", [("moe_fsdp2", 2, 1), ("ddp", 1, 2)])
def test_resume_on_another_process_count(
    moe_checkpoint, tokenizer_dir, tmp_path, strategy, before, after
):
    moe_dir, _ = moe_checkpoint("qwen2_moe")
    tok, ckpts = str(tokenizer_dir), tmp_path / "ckpts"
    settings = dict(max_steps=4, checkpoint_every=2, checkpoint_dir=str(ckpts))
    full = run_fabric(tmp_path / "a", moe_dir, tok, before, strategy,
                      accumulate_grad_batches=2 // before, **settings)  # fmt: skip
    resumed = run_fabric(
        tmp_path / "b", moe_dir, tok, after, strategy, accumulate_grad_batches=2 // after,
        **{**settings, "checkpoint_every": 0, "ckpt_path": str(ckpts / "step-000002")},
    )  # fmt: skip
    reference, again = full["states"][0], resumed["states"][0]
    assert set(reference) == set(again)
    worst = max((reference[k] - again[k]).abs().max().item() for k in reference)
    print(f"{strategy} {before} -> {after} processes: max |resumed - uninterrupted| = {worst:.3g}")
    assert worst < RESHARD_TOLERANCE
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert timeless(resumed["history"])[:2] == timeless(full["history"])[:2]
    for mine, theirs in zip(resumed["history"][2:], full["history"][2:], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_keep_last_prunes_older_steps(moe_checkpoint, tokenizer_dir, tmp_path):
    moe_dir, _ = moe_checkpoint()
    root = tmp_path / "ckpts"
    local_train(
        moe_dir, str(tokenizer_dir), max_steps=4, checkpoint_every=1, checkpoint_dir=str(root)
    )
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
    # the router stage's step checkpoint: routers and their moments only (a few kB here)
    sizes = {p.name: p.stat().st_size for p in (root / "step-000004").iterdir()}
    routers = load_file(str(root / "step-000004" / "trainable.safetensors"))
    assert len(routers) == 2 and all(k.endswith("gate.weight") for k in routers)
    assert sizes["trainable.safetensors"] < 10_000


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "damage, match",
    [
        ("no_manifest", "not a complete moe_ct_training step checkpoint"),
        ("garbage_manifest", "trainer_state.json is corrupt"),
        ("truncated_weights", "trainable.safetensors is missing, truncated or corrupt"),
        ("other_stage", "another stage, strategy, global batch or data mixture"),
        ("other_global_batch", r"processes x accumulate_grad_batches': \(1, 2\)"),
        ("other_model", "continues training of another model"),
    ],
)
def test_a_bad_ckpt_path_is_refused_and_nothing_is_written(
    moe_checkpoint, tokenizer_dir, tmp_path, damage, match
):
    moe_dir, _ = moe_checkpoint()
    root = tmp_path / "ckpts"
    local_train(moe_dir, str(tokenizer_dir), checkpoint_every=2, checkpoint_dir=str(root))
    step = root / "step-000002"
    extra = {}
    if damage == "no_manifest":
        (step / "trainer_state.json").unlink()
    elif damage == "garbage_manifest":
        (step / "trainer_state.json").write_text("{not json")
    elif damage == "truncated_weights":
        data = (step / "trainable.safetensors").read_bytes()
        (step / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "other_stage":
        extra = {"stage": "experts"}
    elif damage == "other_global_batch":  # 1 process x 1 micro-batch, now 1 x 2
        extra = {"accumulate_grad_batches": 2}
    else:  # another MoE: the same shapes, other frozen weights
        moe_dir, _ = moe_checkpoint("qwen2_moe")
    before = _snapshot(root)
    out = tmp_path / "trained"
    algo = MoECTTrainingAlgorithm(
        train_sources={"gpl": {"text": real_text()}}, max_steps=4, batch_size=2, seq_len=32,
        accelerator="cpu", ckpt_path=str(step), save_checkpoint=str(out), **extra,
    )  # fmt: skip
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        algo.run(pool({"_pretrained_": moe_dir}, tokenizer=str(tokenizer_dir)))
    assert "\n" not in str(err.value) and str(step) in str(err.value)
    assert _snapshot(root) == before and not out.exists()


KILLER = """
import os, signal, sys
import safetensors.torch as st
real, calls = st.save_file, []
def dying(tensors, path, *a, **k):  # the Nth write: half a file, then SIGKILL
    calls.append(path)
    if len(calls) == int(os.environ["KILL_AT_WRITE"]):
        with open(path, "wb") as f:
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
st.save_file = dying
import fusion_bench_moect.training.checkpoints as ck
ck.save_file = dying
sys.path.insert(0, sys.argv[1])
from helpers import local_train
local_train(sys.argv[2], sys.argv[3], max_steps=4, checkpoint_every=1, checkpoint_dir=sys.argv[4], keep_last=None)
"""


@pytest.mark.parametrize("kill_at_write", [1, 4, 6])
def test_a_write_killed_midway_leaves_no_visible_step(
    moe_checkpoint, tokenizer_dir, tmp_path, kill_at_write
):
    """Two files per step checkpoint: write 1 is step 1's first, 4 step 2's second, 6 step 3's
    second (after its first was complete)."""
    moe_dir, _ = moe_checkpoint()
    root = tmp_path / "ckpts"
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at_write)}
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", KILLER, tests, moe_dir, str(tokenizer_dir), str(root)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    complete = (kill_at_write - 1) // 2
    visible = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert visible == [f"step-{s:06d}" for s in range(1, complete + 1)]
    assert any(p.name.startswith(".step-") for p in root.iterdir())  # the killed write's
    resume = {"ckpt_path": str(root / visible[-1])} if complete else {}  # the newest resumes
    algo, _ = local_train(
        moe_dir,
        str(tokenizer_dir),
        max_steps=4,
        checkpoint_every=1,
        checkpoint_dir=str(root),
        **resume,
    )
    assert [h["step"] for h in algo.history] == [1, 2, 3, 4]
    # the next run into the same place removed the dead writer's temporary
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
