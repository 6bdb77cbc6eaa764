"""``fusion_bench method=moe_ct_training`` on 2 DDP processes (CPU, gloo) from any directory:
trains, logs to TensorBoard in the run's log dir, saves a checkpoint both transformers
majors load."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fusion_bench, real_text, reload_logits, training_history, weights


def test_cli_trains_on_two_ddp_processes(
    moe_checkpoint, tokenizer_dir, tmp_path, real_ids, other_python
):
    moe_dir, _ = moe_checkpoint("mixtral")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text())
    log_dir, out_dir = tmp_path / "logs", tmp_path / "trained"
    fusion_bench(
        tmp_path,
        "method=moe_ct_training",
        "method.stage=experts",
        "method.max_steps=2",
        "method.batch_size=2",
        "method.seq_len=32",
        "~method.train_sources",  # replace the default sources, not merge with them
        f"+method.train_sources={{corpus:'{corpus}'}}",
        f"method.save_checkpoint={out_dir}",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={moe_dir}",
        f"modelpool.tokenizer={str(tokenizer_dir)}",
        "modelpool.model_kwargs.dtype=float32",
        "taskpool=dummy",
        "fabric.accelerator=cpu",
        "fabric.devices=2",
        "fabric.strategy=ddp",
        f"hydra.run.dir={log_dir}",
        f"path.log_dir={log_dir}",
    )
    config = json.loads((out_dir / "config.json").read_text())
    params = config["moe_ct_training"]["params"]
    assert params["stage"] == "experts" and params["max_steps"] == 2
    history = json.loads((out_dir / "training_history.json").read_text())["train"]
    assert [h["step"] for h in history] == [1, 2]
    events = list(log_dir.rglob("events.out.tfevents*"))
    assert events, "no TensorBoard log in the run's log dir"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/mean_cv", "train/mean_anchor_share"} <= set(tags)
    logits, _ = reload_logits(out_dir, real_ids, tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = reload_logits(out_dir, real_ids, tmp_path / "other", python=other_python)
    assert torch.allclose(logits, other, atol=1e-5)


def cli_run(tmp_path, name, moe_dir, tok, corpus, *extra):
    """``fusion_bench method=moe_ct_training`` on 2 CPU processes; returns the saved model's
    directory (its own run and log directories under ``tmp_path / name``)."""
    out, logs = tmp_path / name, tmp_path / f"{name}-logs"
    fusion_bench(
        tmp_path,
        "method=moe_ct_training",
        "method.stage=experts",
        "method.max_steps=4",
        "method.batch_size=2",
        "method.seq_len=32",
        "method.learning_rate=1e-3",
        "~method.train_sources",
        f"+method.train_sources={{corpus:'{corpus}'}}",
        f"method.save_checkpoint={out}",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={moe_dir}",
        f"modelpool.tokenizer={tok}",
        "modelpool.model_kwargs.dtype=float32",
        "taskpool=dummy",
        "fabric.accelerator=cpu",
        "fabric.devices=2",
        "fabric.loggers=null",
        f"hydra.run.dir={logs}",
        *extra,
    )
    return out


@pytest.mark.cross_version  # issue 18: the sharded CLI path under both majors in CI
def test_cli_fsdp2_trains_like_ddp_evaluates_and_resumes(
    moe_checkpoint, tokenizer_dir, tmp_path, real_ids, other_python
):
    moe_dir, _ = moe_checkpoint("mixtral")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text())
    held_out = f"+method.eval_sources={{gpl:{{text:'{real_text()[::3][:3000]}'}}}}"
    ckpts = tmp_path / "ckpts"
    fsdp = cli_run(
        tmp_path, "fsdp2", moe_dir, str(tokenizer_dir), corpus, "fabric=moe_fsdp2", held_out,
        "method.eval_window=64", "method.eval_every=2", "method.checkpoint_every=2",
        f"method.checkpoint_dir={ckpts}",
    )  # fmt: skip
    ddp = cli_run(tmp_path, "ddp", moe_dir, str(tokenizer_dir), corpus, "fabric.strategy=ddp")
    resumed = cli_run(
        tmp_path, "resumed", moe_dir, str(tokenizer_dir), corpus, "fabric=moe_fsdp2", held_out,
        "method.eval_window=64", "method.eval_every=2", f"method.ckpt_path={ckpts}/step-000002",
    )  # fmt: skip
    sharded, reference, again = weights(fsdp), weights(ddp), weights(resumed)
    assert max((sharded[k] - reference[k]).abs().max().item() for k in reference) < 1e-6
    assert all(torch.equal(sharded[k], again[k]) for k in sharded)
    assert training_history(fsdp) == training_history(resumed)
    assert [e["step"] for e in training_history(fsdp)["eval"]] == [0, 2, 4]
    logits, _ = reload_logits(fsdp, real_ids, tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = reload_logits(fsdp, real_ids, tmp_path / "other", python=other_python)
    assert torch.allclose(logits, other, atol=1e-5)
