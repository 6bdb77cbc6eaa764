"""Every output directory has a model card (README.md) the Hub reads: the build through the
``fusion_bench`` CLI (with its task pool's results), the Python API, the lean CLI and training;
written inside the checkpoint's temporary directory, so a killed run leaves none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    REPO,
    add_tokenizer,
    fusion_bench,
    perturbed,
    pool,
    real_text,
    report,
    train_moe,
)

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm
from fusion_bench_moect.cli.upcycle import main as lean_main
from fusion_bench_moect.io.model_card import add_results
from fusion_bench_moect.model_card import number, results_section, with_results

SOURCE_CARD = "This card describes a dense source model"
GLM = ["architecture=glm4_moe", "granularity=2", "n_group=3", "topk_group=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tokenizer_dir):
    """A tiny Llama base (with the tokenizer) and two fine-tunes, each with its own card."""
    root = tmp_path_factory.mktemp("carded")
    dense = tiny_model("llama", layers=3)
    paths = {"_pretrained_": root / "base", "de": root / "de", "fr": root / "fr"}
    for (name, path), model in zip(
        paths.items(), [dense, perturbed(dense, 1), perturbed(dense, 2)], strict=True
    ):
        model.save_pretrained(path)
        (path / "README.md").write_text(f"---\nlicense: mit\n---\n{SOURCE_CARD}: {name}\n")
    add_tokenizer(tokenizer_dir, paths["_pretrained_"])
    return {name: str(path) for name, path in paths.items()}


def front_matter(directory) -> dict:
    text = (Path(directory) / "README.md").read_text()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


def check_card(directory, given: list[str], family: str) -> str:
    """The card of ``directory``: Hub metadata naming ``given`` (the base, then the sources),
    the family, and the per-layer alphas of its ``config.moe_ct``; returns its text."""
    from huggingface_hub import ModelCard

    meta = front_matter(directory)
    assert meta["base_model"] == given
    assert meta["library_name"] == "transformers"
    assert {"moe", "moe-ct", "fusion-bench", family} <= set(meta["tags"])
    card = ModelCard.load(Path(directory) / "README.md")  # the Hub's own parser
    assert card.data.base_model == given and card.data.library_name == "transformers"
    text = card.text  # the body, after the metadata
    assert SOURCE_CARD not in text  # a source's card is not copied as if it were the MoE's
    config = json.loads((Path(directory) / "config.json").read_text())
    record = config["moe_ct"]
    if len(given) > 1:
        assert ", ".join(f"{a:.3f}" for a in record["alphas"]) in text
    for name in record["expert_sources"]:
        assert f"`{name}`" in text
    assert not [p.name for p in Path(directory).iterdir() if p.name.startswith(".")]
    return text


def test_fusion_bench_run_cards_the_merge_and_its_evaluation(models, tmp_path):
    """The card is written with the checkpoint, then the program's evaluation (the task
    pool's report) is put into it."""
    out, log_dir = tmp_path / "moe", tmp_path / "logs"
    text_file = tmp_path / "notes.txt"
    text_file.write_text(real_text())
    fusion_bench(
        tmp_path,
        "method=moe_ct_upcycling",
        *(f"method.{o}" for o in GLM),
        "method.dtype=float32",
        f"method.save_checkpoint={out}",
        "modelpool=CausalLMPool/moe_ct_merge",
        f"modelpool.models._pretrained_={models['_pretrained_']}",
        f"modelpool.models.expert_de={models['de']}",
        f"modelpool.models.expert_fr={models['fr']}",
        f"modelpool.tokenizer={models['_pretrained_']}",
        "taskpool=moe_text_files",
        f"+taskpool.sources.notes={text_file}",
        "taskpool.max_tokens_per_source=256",
        "taskpool.window_length=64",
        "taskpool.plots=false",
        f"hydra.run.dir={log_dir}",
        f"path.log_dir={log_dir}",
    )
    text = check_card(out, list(models.values()), "glm4_moe")
    assert "e_score_correction_bias" in text and "3 expert groups" in text
    evaluation = report(log_dir)
    row = f"| notes | {evaluation['sources']['notes']['scored_tokens']} | "
    row += number(evaluation["perplexity"]["notes"])
    ref = evaluation["references"]["_pretrained_"]["perplexity"]["notes"]
    row += f" | {number(ref)} | {number(evaluation['perplexity_ratio']['notes'])} |"
    assert row in text


def test_lean_cli_and_python_api_write_the_same_recipe(models, tmp_path):
    """The lean CLI names the directories as given on its command line; the Python API
    the pool's paths; in memory and streamed alike."""
    given = list(models.values())
    lean = tmp_path / "lean"
    argv = [models["_pretrained_"], str(lean), "--source", f"de={models['de']}", "-q"]
    assert lean_main([*argv, "--source", f"fr={models['fr']}", "--seed", "7"]) == 0
    cards = {"lean": check_card(lean, given, "mixtral")}
    for streaming in (False, True):
        out = tmp_path / f"api-{streaming}"
        OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(out), streaming=streaming, seed=7).run(
            pool(models, tokenizer=models["_pretrained_"])
        )
        cards[out.name] = check_card(out, given, "mixtral")
    bodies = {  # all but the title, the directory's name
        name: text.replace(f"# {name}\n", "# TITLE\n", 1) for name, text in cards.items()
    }
    assert len(set(bodies.values())) == 1, bodies
    assert "`seed: 7`" in bodies["lean"]


def test_pure_upcycling_card_names_the_base_only(models, tmp_path):
    out = tmp_path / "pure"
    OrthogonalMoECTMergingAlgorithm(
        save_checkpoint=str(out), num_experts=4, architecture="glm4_moe", moe_layers=[1, 2]
    ).run(pool({"_pretrained_": models["_pretrained_"]}))
    text = check_card(out, [models["_pretrained_"]], "glm4_moe")
    assert "base_model_relation" not in front_matter(out)
    assert "pure upcycling" in text and "the base's dense FFN in layers 0." in text


def test_training_card_has_the_run_the_data_and_the_curves(models, tmp_path, tokenizer_dir):
    moe = tmp_path / "moe"
    OrthogonalMoECTMergingAlgorithm(save_checkpoint=str(moe), dtype="float32").run(
        pool(models, tokenizer=models["_pretrained_"])
    )
    trained = tmp_path / "trained"
    algo, _ = train_moe(
        str(moe),
        str(tokenizer_dir),
        save_checkpoint=str(trained),
        stage="experts",
        eval_sources={"held_out": {"text": real_text()[-3000:]}},
        eval_max_tokens_per_source=64,
        eval_window=32,
    )
    meta = front_matter(trained)
    assert meta["base_model"] == [str(moe)] and meta["base_model_relation"] == "finetune"
    assert {"moe", "moe-ct", "fusion-bench", "mixtral", "moe-ct-training"} <= set(meta["tags"])
    text = (trained / "README.md").read_text()
    first, last = algo.evaluations[0], algo.evaluations[-1]
    assert last["step"] == 3
    row = f"| held_out | {number(first['perplexity']['held_out'])} | "
    assert row + f"{number(last['perplexity']['held_out'])} |" in text
    assert "![training history](training_history.png)" in text
    assert (trained / "training_history.png").is_file()
    config = json.loads((trained / "config.json").read_text())
    plan = config["moe_ct_training"]["data_plan"]  # the run's plan is the mixture's table
    assert (
        "| source | data | tokens | windows | weight | share | windows_per_step | epochs |" in text
    )
    gpl = plan["gpl"]
    assert f" characters | {gpl['tokens']} | {gpl['windows']} | n/a | 1 |" in text
    assert ", ".join(f"{a:.3f}" for a in config["moe_ct"]["alphas"]) in text  # the recipe


KILL_AT_CARD = """
import os, signal, sys
from fusion_bench_moect.cli.upcycle import main

def audit(event, args):
    if event == "open" and str(args[0]).endswith("README.md") and args[1] in ("w", "x"):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(audit)
sys.exit(main(sys.argv[1:]))
"""


def test_a_build_killed_while_writing_its_card_leaves_no_model(models, tmp_path):
    out = tmp_path / "moe"
    argv = [models["_pretrained_"], str(out), "--source", f"de={models['de']}", "-q"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_CARD, *argv], capture_output=True, text=True, env=env
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".moe.tmp-")]
    assert len(temporaries) == 1 and (temporaries[0] / "config.json").is_file()
    assert lean_main(argv) == 0  # the next run clears the temporary and writes all
    check_card(out, [models["_pretrained_"], models["de"]], "mixtral")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe.")]


def test_results_of_other_task_pools_and_cards_without_a_results_section(tmp_path):
    lm_eval = {"results": {"wiki": {"word_perplexity": 31.5, "bits_per_byte": 1.25}}}
    assert "| wiki | 31.5 | 1.25 |" in results_section(lm_eval)
    fusion_style = {"svhn": {"accuracy": 0.5}, "mnist": {"accuracy": 0.75}, "seconds": 2.0}
    lines = results_section(fusion_style)
    assert "| svhn | 0.5 |" in lines and "| mnist | 0.75 |" in lines and "`seconds` 2." in lines
    foreign = tmp_path / "README.md"
    foreign.write_text("# someone else's card\n")
    assert not add_results(tmp_path, lm_eval)
    assert foreign.read_text() == "# someone else's card\n"
    with pytest.raises(ValueError, match="RESULTS"):
        with_results("# no section\n", lm_eval)
