"""What a user sees on success: the README's main job and quick starts, output captured (not a
terminal), print no WARNING, no progress-bar cursor moves (ESC [A) and no contradictory line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from helpers import REPO, add_tokenizer, perturbed, real_text, unavailable

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def assert_quiet(text: str) -> None:
    marks = ("WARNING", "Warning:", "deprecated")  # e.g. transformers 5 on torch_dtype
    noisy = [line for line in text.splitlines() if any(mark in line for mark in marks)]
    assert not noisy, noisy
    assert "\x1b[A" not in text
    if "Saved MoE checkpoint to" in text:  # then FusionBench's "nothing saved" is wrong
        assert "No save path specified" not in text


def run(command: list[str], cwd: Path, **env: str) -> str:
    """``command``'s output (stdout, then stderr); it must succeed. ``env``: more variables."""
    out = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**ENV, **env},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tokenizer_dir) -> Path:
    """A tiny Llama base with the tokenizer (``base``) and two fine-tunes (``base-de``/``-fr``)."""
    root = tmp_path_factory.mktemp("quick")
    dense = tiny_model("llama")
    dense.save_pretrained(root / "base")
    add_tokenizer(tokenizer_dir, root / "base")
    perturbed(dense, 1).save_pretrained(root / "base-de")
    perturbed(dense, 2).save_pretrained(root / "base-fr")
    return root


def test_readme_merge_quick_start(models, tmp_path):
    """README "Use it": two fine-tunes merged (3 experts, not a power of two: the llama.cpp
    advice is an INFO line of the plan, not a warning), saved, evaluated."""
    text = run(
        [
            str(BIN / "fusion_bench"),
            "method=moe_ct_upcycling",
            "modelpool=CausalLMPool/moe_ct_merge",
            f"modelpool.models._pretrained_={models / 'base'}",
            f"modelpool.models.expert_de={models / 'base-de'}",
            f"modelpool.models.expert_fr={models / 'base-fr'}",
            "method.alpha_strategy=u_shaped",
            "method.base_alpha=0.8",
            f"method.save_checkpoint={tmp_path / 'base-moe'}",
            "taskpool=moe_text_perplexity",
            "taskpool.max_tokens_per_source=256",
            f"hydra.run.dir={tmp_path / 'logs'}",
            f"path.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )
    assert_quiet(text)
    assert "Saved MoE checkpoint to" in text and "For llama.cpp: num_experts=3" in text


def test_lean_cli_quick_start(models, tmp_path):
    text = run(
        [
            sys.executable,
            "-m",
            "fusion_bench_moect.cli.upcycle",
            str(models / "base"),
            str(tmp_path / "moe"),
            f"--source=de={models / 'base-de'}",
            f"--source=fr={models / 'base-fr'}",
        ],
        tmp_path,
    )
    assert_quiet(text)
    assert "Saved MoE checkpoint to" in text


@pytest.mark.skipif(
    not transformers.__version__.startswith("5."), reason="the main job runs once: under 5.x"
)
def test_main_job_output(tmp_path):
    """``bash scripts/main.sh`` (set-up included), evaluating 1024 tokens per language
    instead of 4096 (the same code, a quarter of the time)."""
    if not (REPO / ".venv/bin/fusion_bench").is_file():
        unavailable("a .venv in this checkout (scripts/setup.sh makes it)")
    text = run(["bash", "scripts/main.sh", "taskpool.max_tokens_per_source=1024"], REPO)
    report = next(line for line in text.splitlines() if line.startswith("Report: "))
    shutil.rmtree(REPO / Path(report.split()[1]).parent, ignore_errors=True)
    assert_quiet(text)
    assert "MoETextTaskPool summary" in text


def test_training_on_two_processes_speaks_once(moe_checkpoint, tokenizer_dir, tmp_path):
    """Issue 29: under DDP only rank 0 logs (each step line and FusionBench's "Loading model"
    once), no "No save path specified" after the save, no transformers bar as ``\\r`` lines;
    ``model_kwargs.torch_dtype`` (FusionBench's spelling) overrides the pool's ``dtype`` with
    no deprecation warning; ``~`` in ``save_checkpoint`` is the home directory; the record
    says what ran (2 CPU processes under DDP, 32-true), not the method's unused defaults."""
    moe_dir, _ = moe_checkpoint("mixtral")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text())
    command = [
        str(BIN / "fusion_bench"),
        "method=moe_ct_training",
        "method.stage=experts",
        "method.max_steps=2",
        "method.log_every=1",
        "method.batch_size=2",
        "method.seq_len=32",
        "~method.train_sources",
        f"+method.train_sources={{corpus:'{corpus}'}}",
        "method.save_checkpoint='~/trained'",  # quoted: Hydra's grammar has no bare ~
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={moe_dir}",
        f"modelpool.tokenizer={tokenizer_dir}",
        "modelpool.model_kwargs.torch_dtype=float32",  # the pool's dtype says bfloat16
        "taskpool=dummy",
        "fabric.accelerator=cpu",
        "fabric.devices=2",
        "fabric.strategy=ddp",
        "fabric.precision=32-true",
        "fabric.loggers=null",
        f"hydra.run.dir={tmp_path / 'logs'}",
    ]
    text = run(command, tmp_path, HOME=str(tmp_path))
    assert_quiet(text)
    assert "\r" not in text
    assert text.count("Loading model: _pretrained_") == 1
    assert [text.count(f"step {n}: loss") for n in (1, 2)] == [1, 1]
    trained = tmp_path / "trained"
    assert (trained / "training_history.png").is_file() and not (tmp_path / "~").exists()
    config = json.loads((trained / "config.json").read_text())
    assert config["dtype"] == "float32"
    record = config["moe_ct_training"]
    assert record["run"] == {
        "strategy": "DDPStrategy",
        "sharded": False,
        "processes": 2,
        "nodes": 1,
        "accelerator": "cpu",
        "precision": "32-true",
        "mixed_precision": None,
    }
    assert record["params"]["accelerator"] == "cpu"
    assert record["params"]["save_checkpoint"] == str(trained)


def test_other_ranks_keep_only_their_warnings_and_say_whose():
    """``one_voice``: on rank 1 the INFO lines go, a warning comes with ``rank 1:`` (once,
    however many handlers it meets); rank 0 is untouched; the filters go with the block."""
    import logging

    from fusion_bench_moect.training.voice import one_voice

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handlers = [Collect(), Collect()]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    log = logging.getLogger("fusion_bench_moect.test_voice")
    log.setLevel(logging.INFO)
    try:
        with one_voice(1):
            log.info("step 1: loss 2.0")
            log.warning("slow disk")
        with one_voice(0):
            log.info("step 2: loss 1.0")
        log.info("after")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
    assert seen == ["rank 1: slow disk"] * 2 + ["step 2: loss 1.0"] * 2 + ["after"] * 2
