"""The real ``fusion_bench`` CLI finds our method and pools from any working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO, fusion_bench, perturbed, pool, report

from fusion_bench_moect import OrthogonalMoECTMergingAlgorithm


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("pool")
    dense = tiny_model("llama")
    dense.save_pretrained(root / "base")
    perturbed(dense, 1).save_pretrained(root / "de")
    perturbed(dense, 2).save_pretrained(root / "fr")
    return root


def test_cli_from_the_repository_root(tiny_pool, tmp_path):
    """The repo root has a config/ folder, which FusionBench alone would take as its only
    config directory; our search-path plugin keeps FusionBench's own configs reachable."""
    log_dir = tmp_path / "logs"
    fusion_bench(
        REPO,
        "method=moe_ct_upcycling",
        "modelpool=CausalLMPool/moe_ct_merge",
        f"modelpool.models._pretrained_={tiny_pool / 'base'}",
        f"modelpool.models.expert_de={tiny_pool / 'de'}",
        f"modelpool.models.expert_fr={tiny_pool / 'fr'}",
        "modelpool.tokenizer=null",
        "taskpool=dummy",
        f"hydra.run.dir={log_dir}",
        f"path.log_dir={log_dir}",
    )
    models = {
        n: str(tiny_pool / p)
        for n, p in [("_pretrained_", "base"), ("expert_de", "de"), ("expert_fr", "fr")]
    }
    expected = OrthogonalMoECTMergingAlgorithm().run(pool(models))
    assert report(log_dir)["model_info"]["all_params"] == sum(
        p.numel() for p in expected.parameters()
    )


def test_cli_from_another_directory_saves_a_checkpoint(tiny_pool, tmp_path):
    log_dir, out_dir = tmp_path / "logs", tmp_path / "moe"
    fusion_bench(
        tmp_path,
        "method=moe_ct_upcycling",
        "method.num_experts=4",
        "method.granularity=2",
        "method.experts_per_token=2",
        f"method.save_checkpoint={out_dir}",
        "modelpool=CausalLMPool/moe_ct_upcycle",
        f"modelpool.models._pretrained_={tiny_pool / 'base'}",
        "modelpool.tokenizer=null",
        "taskpool=dummy",
        f"hydra.run.dir={log_dir}",
        f"path.log_dir={log_dir}",
    )
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["moe_ct"]["granularity"] == 2
    assert config["moe_ct"]["params"]["num_experts"] == 4
    assert "model_info" in report(log_dir)


def test_wheel_ships_the_configs_and_the_plugin(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("fusion_bench_moect-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fusion_bench_moect/yaml_config/method/moe_ct_upcycling.yaml" in names
    assert "fusion_bench_moect/yaml_config/modelpool/CausalLMPool/moe_ct_merge.yaml" in names
    assert "hydra_plugins/fusion_bench_moect_searchpath/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # must stay a namespace package
    assert "fusion_bench_moect/_config.py" in names  # not shadowed by the YAML folder
    # the installed wheel's plugin resolves its own bundled configs
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hydra_plugins.fusion_bench_moect_searchpath import config_dir; print(config_dir())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert probe.stdout.strip() == str(target / "fusion_bench_moect" / "yaml_config"), probe.stderr
